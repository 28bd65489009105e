#!/usr/bin/env bash
# What each decoding knob does to a small model: run after scripts/quickstart.sh (or set RUN).
set -euo pipefail
cd "$(dirname "$0")/.."
LLMKIT=${LLMKIT:-.venv/bin/llmkit}
RUN=${RUN:-runs/quickstart}
[ -d "$RUN" ] || { echo "no model at $RUN: run 'bash scripts/quickstart.sh' first (or set RUN)"; exit 1; }
P="La ville de"
show() { echo "--- $*"; $LLMKIT generate "$RUN" --prompt "$P" -n 40 --quiet "$@"; }
show --greedy
show --greedy --repetition-penalty 1.3
show --greedy --repetition-penalty 1.15 --frequency-penalty 0.3
show --greedy --no-repeat-ngram 3
show --temperature 0.7 --top-p 0.9 --seed 0
show --temperature 1.2 --min-p 0.1 --seed 0
show --num-beams 4 --no-repeat-ngram 3
show --temperature 0.8 --seed 0 --stop "."
$LLMKIT generate "$RUN" --prompt "Le pain" -n 8 --greedy --show-probs --quiet
printf 'Le pain\nLa mer\nLes abeilles\n' | $LLMKIT generate "$RUN" -n 20 --json --seed 0 --quiet
