"""Which layer of a checkpoint carries a classification task? A linear probe of each layer's mean state:
after the embeddings, after each block and after the final LayerNorm, beside the same model with random
weights. Each text is tokenized as the classifier reads it (`classification_input`: its tokens, then EOS);
scikit-learn's logistic regression on the labelled rows, standardised features, the best of C in
{0.01, 0.1, 1} on dev (an optimistic number: the choice is not held out).

    python bench/sst2_layer_probe.py --checkpoint runs/pretrain/final --train sst/labelled.tsv --dev sst/dev.tsv
"""

from __future__ import annotations

import argparse
import csv
import time

import numpy as np
import torch


def read_tsv(path: str, text_field: str) -> tuple[list[str], np.ndarray]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [row[text_field] for row in rows], np.array([row["label"] for row in rows])


@torch.no_grad()
def layer_means(model, tokenizer, texts: list[str]) -> np.ndarray:
    """(texts, layers + 2, d_model): each text's mean state after the embeddings, each block, ln_f."""
    from mtnlg_ray.model.classifier import classification_input
    from mtnlg_ray.tokenizer import eos_id

    eos, out = eos_id(tokenizer), []
    for text in texts:
        idx = torch.tensor([classification_input(tokenizer.encode(text).ids, eos, model.config.seq_len)])
        x = model.tok_emb(idx)
        if model.pos_emb is not None:
            x = x + model.pos_emb(torch.arange(idx.shape[1]))[None]
        means = [x.mean(1)]
        for block in model.blocks:
            x = block(x)
            means.append(x.mean(1))
        means.append(model.ln_f(x).mean(1))
        out.append(torch.cat(means))
    return torch.stack(out).numpy()


def probe(train: np.ndarray, train_y: np.ndarray, dev: np.ndarray, dev_y: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scale = StandardScaler().fit(train)
    return max(LogisticRegression(C=c, max_iter=2000).fit(scale.transform(train), train_y)
               .score(scale.transform(dev), dev_y) for c in (0.01, 0.1, 1.0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a consolidated language-model checkpoint")
    parser.add_argument("--train", required=True, help="TSV with a label column and the text column")
    parser.add_argument("--dev", required=True)
    parser.add_argument("--text-field", default="sentence")
    parser.add_argument("--seed", type=int, default=0, help="the random-weights model's seed")
    args = parser.parse_args()

    from mtnlg_ray.checkpoint import load_checkpoint
    from mtnlg_ray.model import GPT
    from mtnlg_ray.tokenizer import load_tokenizer

    torch.set_num_threads(1)
    trained, _ = load_checkpoint(args.checkpoint)
    tokenizer = load_tokenizer(f"{args.checkpoint}/tokenizer.json")
    torch.manual_seed(args.seed)
    random = GPT(trained.config).eval()
    (train_x, train_y), (dev_x, dev_y) = read_tsv(args.train, args.text_field), read_tsv(args.dev, args.text_field)
    names = ["embeddings", *(f"block {i + 1}" for i in range(trained.config.n_layer)), "final LayerNorm"]
    print("| model | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for label, model in (("trained", trained), (f"random weights (seed {args.seed})", random)):
        start = time.perf_counter()
        train, dev = layer_means(model, tokenizer, train_x), layer_means(model, tokenizer, dev_x)
        scores = [probe(train[:, i], train_y, dev[:, i], dev_y) for i in range(len(names))]
        print(f"| {label} | " + " | ".join(f"{s:.3f}" for s in scores) + f" |  ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
