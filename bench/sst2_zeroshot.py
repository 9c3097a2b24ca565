"""Does a pretrained checkpoint's next-token prediction already know a sentence's sentiment? (SST-2, no training)

For each dev sentence and prompt, the language model reads "SENTENCE PROMPT" and the score is the logit of a
positive word minus that of a negative one at the last position (" , it 's" -> great vs terrible). Raw
comparisons favour whichever word is more frequent, so the score is thresholded at its median over the dev
set (a balanced split; SST-2 dev is 51 % positive), as calibration methods for prompted LMs do. Accuracy
near 0.5 means prompt-based fine-tuning (a head initialised from the verbalizer words) has nothing to start from.

    python bench/sst2_zeroshot.py --checkpoint work/sst2-run/runs/pretrain/final \
        --tokenizer work/sst2-run/pretrain_data/tokenizer --dev ../shared/data/sst2/dev.tsv
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

PROMPTS = (" , it 's", " . it 's", " . the film is")
WORDS = (("good", "bad"), ("great", "terrible"), ("best", "worst"))


def main() -> None:
    from mtnlg_ray.checkpoint import load_checkpoint
    from mtnlg_ray.finetune.data import read_classification
    from mtnlg_ray.tokenizer import load_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="a consolidated pretrained checkpoint")
    parser.add_argument("--tokenizer", type=Path, required=True, help="folder holding its tokenizer.json")
    parser.add_argument("--dev", type=Path, required=True, help="SST-2 dev.tsv (label, sentence)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model, _ = load_checkpoint(args.checkpoint)
    tok = load_tokenizer(args.tokenizer / "tokenizer.json")
    rows = read_classification(args.dev, "sentence", "label").rows
    labels = [row.label == "1" for row in rows]
    limit = model.config.seq_len

    print("| prompt | positive / negative word | raw accuracy | median-calibrated accuracy |")
    print("|---|---|---:|---:|")
    for prompt in PROMPTS:
        last_logits = []
        with torch.no_grad():
            for row in rows:
                ids = tok.encode(row.text.strip() + prompt).ids[-limit:]
                last_logits.append(model(torch.tensor([ids]), last_only=True)[0, -1])
        for pos, neg in WORDS:
            word_ids = [tok.encode(" " + w).ids for w in (pos, neg)]
            if any(len(ids) != 1 for ids in word_ids):
                print(f"| {prompt!r} | {pos} / {neg} | (not single tokens) | |")
                continue
            p, n = word_ids[0][0], word_ids[1][0]
            scores = [(logits[p] - logits[n]).item() for logits in last_logits]
            raw = sum((s > 0) == y for s, y in zip(scores, labels)) / len(rows)
            median = statistics.median(scores)
            calibrated = sum((s > median) == y for s, y in zip(scores, labels)) / len(rows)
            print(f"| {prompt!r} | {pos} / {neg} | {raw:.4f} | {calibrated:.4f} |", flush=True)


if __name__ == "__main__":
    main()
