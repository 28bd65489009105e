#!/usr/bin/env bash
# Faster to a better model: a model sized to a time budget (no preset), the speed probe's choice
# of precision and compilation, then the decoding levers on it — int8 weights, prompt lookup, and
# a smaller draft model with the same tokenizer or the model's own int8 twin (speculative decoding,
# the plain greedy output).
# Uses the bundled sample only (about 2 minutes on a 2-core laptop).
set -euo pipefail
cd "$(dirname "$0")/.."
LLMKIT=${LLMKIT:-.venv/bin/llmkit}
OUT=${OUT:-runs/example-faster}
rm -rf "$OUT"

# No preset, a budget: the "sized to the budget:" line says which shape and why; the "model:" line
# says which precision (and whether compiled) the speed probe found fastest on this machine.
$LLMKIT pretrain llmkit/sample/ --time 60s -o "$OUT/auto"

# A small draft with the same tokenizer, for speculative decoding.
$LLMKIT pretrain llmkit/sample/ --tokenizer "$OUT/auto/tokenizer" --preset tiny --time 20s \
  --set model.n_layer=1 --set model.d_model=64 --set model.n_head=2 --set model.n_kv_head=1 -o "$OUT/draft"

PROMPT="La mer est calme. La mer est"
$LLMKIT generate "$OUT/auto" -p "$PROMPT" -n 60 --greedy                        # the plain path
$LLMKIT generate "$OUT/auto" -p "$PROMPT" -n 60 --greedy --lookup 3             # same text, fewer passes
$LLMKIT generate "$OUT/auto" -p "$PROMPT" -n 60 --greedy --draft "$OUT/draft"   # same text again
$LLMKIT generate "$OUT/auto" -p "$PROMPT" -n 60 --greedy --draft int8           # its int8 twin guesses: same text
$LLMKIT generate "$OUT/auto" -p "$PROMPT" -n 60 --greedy --quantize int8        # int8 weights: close, not equal

# Many prompts at once: each prompt's guesses are checked in the same pass as the others'.
printf 'La mer est calme.\nLe roi dit : « Non. »\nIl était une fois\n' > "$OUT/prompts.txt"
$LLMKIT generate "$OUT/auto" --prompt-file "$OUT/prompts.txt" -n 40 --greedy --lookup 3 --batch-size 3
