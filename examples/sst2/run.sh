#!/usr/bin/env bash
# The SST-2 experiment of BENCHMARKS.md, end to end, from the repository root:
#   bash examples/sst2/run.sh ../shared/data/sst2
# (a) fine-tune from random weights, (b) fine-tune from a model pretrained on the SST-2 train
# sentences as unlabelled text, (c) self-train from (b)'s start. Every step's output lands in work/.
set -euo pipefail
sst2=${1:?usage: run.sh SST2_DIR (holding train.tsv and dev.tsv)}
here=$(dirname "$0")

python "$here/make_splits.py" --sst2 "$sst2" --out work/sst2
mtnlg-ray data prepare work/sst2/pretrain.jsonl --output work/sst2/pretrain_data \
  --set clean.enabled=false --set dedup.fuzzy=false --set tokenizer.vocab_size=4096 \
  --set pack.seq_len=128 --set pack.val_fraction=0.02
mtnlg-ray pretrain --config "$here/pretrain.yaml"
mtnlg-ray finetune --config "$here/finetune.yaml" --set run.name=sst2-random \
  --set init.checkpoint=null --set tokenizer.path=work/sst2/pretrain_data/tokenizer      # (a)
mtnlg-ray finetune --config "$here/finetune.yaml" --set run.name=sst2-pretrained        # (b)
mtnlg-ray self-train --config "$here/selftrain.yaml"                                     # (c)
for run in sst2-random sst2-pretrained sst2-selftrain/round2; do
  mtnlg-ray evaluate -c "work/runs/$run/final" -d work/sst2/dev.tsv --task classification --text-field sentence --json \
    | python -c "import json, sys; r = json.load(sys.stdin); print('$run', 'dev accuracy', round(r['accuracy'], 4))"
done
