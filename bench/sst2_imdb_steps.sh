#!/usr/bin/env bash
# Measured 2026-12-05 for BENCHMARKS.md ("2,600 pretraining steps on the same blend"); reuses the prepared data of an IMDB=1 run.sh OUT.
# (Measured in fp32; examples/sst2/pretrain.yaml has since set train.precision: bf16, so a rerun is 1.4x faster.)
# IMDb blend, 2,600 pretraining steps; then the pretrained fine-tune for seeds 0-2, plain and with token dropout 0.1.
set -euo pipefail
# usage: bash bench/sst2_imdb_steps.sh OUT   (OUT: a finished `IMDB=1 bash examples/sst2/run.sh` folder)
out=$(cd "${1:?usage: sst2_imdb_steps.sh OUT}" && pwd)
cd "$(dirname "$0")/.."
here=examples/sst2
steps=2600
runs=$out/runs2600
mkdir -p "$runs"
s=$EPOCHREALTIME
mtnlg-ray pretrain --config $here/pretrain.yaml --set data.path=$out/pretrain_data --set train.max_steps=$steps \
  --set train.decay_tokens=$((steps * 32 * 128)) --set run.storage_path=$runs --set run.name=pretrain
echo "PRETRAIN_SECONDS $(awk -v a=$s -v b=$EPOCHREALTIME 'BEGIN{print b-a}')"
for td in 0 0.1; do
  for seed in 0 1 2; do
    mtnlg-ray finetune --config $here/finetune.yaml --set data.train=$out/labelled.tsv --set data.dev=$out/dev.tsv \
      --set train.seed=$seed --set run.storage_path=$runs --set run.name=pretrained-td$td-seed$seed \
      --set init.checkpoint=$runs/pretrain --set task.token_dropout=$td 2>&1 | grep "best accuracy" | sed "s/^/RESULT td=$td seed=$seed /"
  done
done
