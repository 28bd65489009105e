#!/usr/bin/env bash
# Fine-tuning, task by task, on the small French files shipped in examples/data (written for the
# project): review polarity (classify, full and LoRA), questions (instruct), French -> English
# (translate, LoRA merged), continued pretraining (lm). The base is the tiny model that
# examples/sample_fr.sh trains on the bundled sample (trained here first if it is missing).
set -euo pipefail
cd "$(dirname "$0")/.."
LLMKIT=${LLMKIT:-.venv/bin/llmkit}
BASE=${BASE:-runs/example-sample/run}
OUT=${OUT:-runs/example-finetune}
D=examples/data
if [ ! -d "$BASE/best" ]; then
  $LLMKIT pretrain -o "$BASE" --preset tiny --time 90s --quiet
fi
rm -rf "$OUT"

# classify: a head on the last token's hidden state; full fine-tuning, then LoRA
$LLMKIT finetune "$BASE" --task classify --data $D/avis.train.jsonl --val $D/avis.dev.jsonl \
  --out "$OUT/avis" --epochs 20 --set train.eval_every=20
$LLMKIT finetune "$BASE" --task classify --data $D/avis.train.jsonl --val $D/avis.dev.jsonl \
  --out "$OUT/avis-lora" --epochs 20 --lora --lora-rank 8 --set train.eval_every=20 --quiet
$LLMKIT classify "$OUT/avis" "Un accueil charmant et un repas parfait." "Une chambre sale et bruyante." --top-k 2
$LLMKIT eval "$OUT/avis-lora" $D/avis.dev.jsonl

# instruct: prompt/response pairs through the default template, loss on the answers only
$LLMKIT finetune "$BASE" --task instruct --data $D/questions.jsonl --out "$OUT/questions" --epochs 40 \
  --lr 1e-3 --set train.eval_every=25 --set task.val_fraction=0.1 --quiet
$LLMKIT generate "$OUT/questions" --prompt "Quelle est la capitale de l'Italie ?" --greedy -n 12

# translate: LoRA, merged into plain weights at the end; generate applies the template
$LLMKIT finetune "$BASE" --task translate --data $D/traduction.jsonl --out "$OUT/traduction" --epochs 40 \
  --lora --lora-rank 16 --merge --set train.eval_every=25 --quiet
printf 'Le chat dort.\nIl fait beau aujourd'"'"'hui.\n' | $LLMKIT generate "$OUT/traduction/merged" -n 16
$LLMKIT eval "$OUT/traduction/merged" $D/traduction.jsonl --limit 10 --show 3

# lm: continued pretraining on one topic of the sample, then its bits per byte before and after
$LLMKIT finetune "$BASE" --task lm --data llmkit/sample/cuisine.txt --out "$OUT/cuisine" --steps 60 \
  --set train.eval_every=20 --quiet
$LLMKIT eval "$BASE" llmkit/sample/cuisine.txt
$LLMKIT eval "$OUT/cuisine" llmkit/sample/cuisine.txt
