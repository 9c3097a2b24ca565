"""Fine-tuning levers that are not `mtnlg-ray finetune` options, tried on an SST-2 run's pretrained model.

    python bench/sst2_levers.py --run OUT [--seed 0] [--token-dropout 0.1] [--freeze-embeddings]
                                [--lm-weight 0.5] [--layer-decay 0.8 --head-lr 1e-3] [--head-only-epochs 2]
                                [--pooling max] [--channel terrible,great] [--leading-eos] [--echo]
                                [--consistency OUT/pool.tsv [--uda-weight 1] [--uda-batch 64] ...]
                                [--ngram-prior 5]

OUT is an `examples/sst2/run.sh` output folder: its pretrained model (OUT/runs/pretrain/final), its
1,000 labels (OUT/labelled.tsv) and the dev split (OUT/dev.tsv). One process, no Ray: a plain loop
with fine-tuning's defaults (mean pooling, dropout 0.1, batch 32, AdamW 0.9/0.95 at LR 3e-4 with
weight decay 0.1, 5 % warm-up then cosine to 10 %, clip 1.0, up to 10 epochs, best dev epoch, patience 3),
plus the lever asked for:

- `--freeze-embeddings`: the token embeddings stay as pretrained (words seen in the 1,000 labels do not
  drift away from those that are not);
- `--lm-weight W`: GPT-1's auxiliary objective, W x the next-token loss on the labelled texts;
- `--layer-decay D`: block i of L trains at LR x D^(L - i), the head at `--head-lr`;
- `--head-only-epochs N`: only the head trains for the first N epochs (linear probe, then fine-tune);
- `--pooling max|mean+max`: the head reads each feature's largest value over the text's positions (a
  sentiment word counts as much in a long sentence as in a short phrase), or that beside the mean;
- `--channel WORDS`: no head. The language model itself classifies, as a noisy channel: the score of
  label i is log p(text | EOS, i-th word of WORDS), and the loss is cross-entropy over those scores,
  one word per label in the labels' sorted order (SST-2: 0 then 1, so `terrible,great`);
- `--leading-eos`: every text opens with EOS, as each document does in packed pretraining (it follows
  the previous one's EOS), instead of starting cold at position 0;
- `--echo`: the model reads each text twice (text, EOS, text, EOS) and the head reads the mean over
  the second copy, whose every position has seen the whole text once: a causal model's states with
  the right context a bidirectional one would have (the "echo embeddings" of Springer et al., 2024).
- `--consistency POOL`: unsupervised data augmentation (Xie et al., 2019) on the unlabelled pool's texts
  (a TSV with a `sentence` column; its labels are never read). Every step also draws `--uda-batch` pool
  texts; the model's own prediction on each whole text (no gradient, dropout off), sharpened by
  `--uda-temperature`, is the target for its prediction on the text with `--uda-dropout` of its tokens
  dropped, a KL term weighted by `--uda-weight` over the rows whose clean confidence reaches
  `--uda-threshold`. No teacher and no pseudo-labels: the pool only asks the model to answer alike
  for a text and its noisy copy.
- `--ngram-prior K`: stacking. The bag-of-n-grams classifier (`fit_ngram_classifier`, `self-train`'s
  n-gram teacher) is fit on the 1,000 labels, and its log-probabilities are a fixed offset under the
  GPT's logits: the fine-tune learns what the n-grams miss (a product of the two experts, trained
  jointly, where stop 50's average of two separately trained ones let the fine-tune's over-confident
  probabilities decide). A training row's offset comes from the classifier fit on the other K - 1
  folds (out of fold, so the offset is no more confident on a training row than on an unseen one);
  a dev row's from the one fit on all 1,000. `--ngram-prior 1` uses the full fit on training rows too.

It prints one JSON line: the best dev accuracy and the accuracy after every epoch. Its batches are
not grouped by length, so its base numbers differ from the command's; compare levers with its own base.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

import common  # noqa: F401  (this checkout on sys.path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="an examples/sst2/run.sh output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--random-init", action="store_true", help="the pretrained shape, random weights")
    parser.add_argument("--token-dropout", type=float, default=0.0)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--freeze-embeddings", action="store_true")
    parser.add_argument("--lm-weight", type=float, default=0.0)
    parser.add_argument("--layer-decay", type=float, default=1.0)
    parser.add_argument("--head-lr", type=float, default=None)
    parser.add_argument("--head-only-epochs", type=int, default=0)
    parser.add_argument("--leading-eos", action="store_true")
    parser.add_argument("--pooling", choices=("mean", "max", "mean+max"), default="mean")
    parser.add_argument("--channel", default=None, metavar="WORDS", help="comma-separated, one word per label")
    parser.add_argument("--echo", action="store_true", help="read each text twice, pool over the second copy")
    parser.add_argument("--ema", type=float, default=0.0,
                        help="score an exponential moving average of the weights with this per-step decay")
    parser.add_argument("--consistency", default=None, metavar="POOL", help="unlabelled TSV for the UDA term")
    parser.add_argument("--uda-weight", type=float, default=1.0)
    parser.add_argument("--uda-batch", type=int, default=64)
    parser.add_argument("--uda-temperature", type=float, default=0.4)
    parser.add_argument("--uda-threshold", type=float, default=0.8)
    parser.add_argument("--uda-dropout", type=float, default=0.2)
    parser.add_argument("--ngram-prior", type=int, default=0, metavar="K",
                        help="n-gram log-probabilities as a fixed logit offset, out of K folds on training rows")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.lm_weight > 0 and (args.pooling != "mean" or args.channel):
        parser.error("--lm-weight works with mean pooling and a head, not with --pooling or --channel")
    if args.channel and (args.head_only_epochs or args.leading_eos or args.pooling != "mean"):
        parser.error("--channel has no head and opens each text with its own prompt: "
                     "not with --head-only-epochs, --leading-eos or --pooling")
    if args.echo and (args.channel or args.leading_eos or args.pooling != "mean" or args.lm_weight > 0
                      or args.token_dropout > 0):
        parser.error("--echo: mean pooling over the second copy, not with --channel, --leading-eos, --pooling, "
                     "--lm-weight or --token-dropout (which would drop other tokens from each copy)")
    if args.consistency and (args.channel or args.echo or args.leading_eos or args.lm_weight > 0):
        parser.error("--consistency: with a head over the text as it is, not --channel, --echo, --leading-eos "
                     "or --lm-weight")
    if args.ngram_prior < 0:
        parser.error("--ngram-prior: expected K >= 0 (0: none; 1: the full fit on training rows too)")
    if args.ngram_prior and (args.channel or args.lm_weight > 0 or args.consistency):
        parser.error("--ngram-prior: an offset under a head's logits, not with --channel, --lm-weight or --consistency")
    if args.leading_eos and args.token_dropout > 0:
        parser.error("--leading-eos: not with --token-dropout (the dropout would drop the leading EOS too)")
    for need in ("runs/pretrain/final/config.json", "labelled.tsv", "dev.tsv"):
        if not (Path(args.run) / need).is_file():
            parser.error(f"--run: {Path(args.run) / need} is missing; give an examples/sst2/run.sh output folder")
    print(json.dumps(run(args)), flush=True)


def run(args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    from mtnlg_ray.checkpoint import load_checkpoint
    from mtnlg_ray.config import TrainSection
    from mtnlg_ray.finetune.data import read_classification
    from mtnlg_ray.model.classifier import GPTClassifier, classification_input, drop_tokens, pad_right
    from mtnlg_ray.tokenizer import eos_id, load_tokenizer
    from mtnlg_ray.train.schedule import learning_rate

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.run)
    start = out / "runs" / "pretrain" / "final"
    gpt, _ = load_checkpoint(start)
    if args.random_init:
        gpt.reset_parameters()
    tokenizer = load_tokenizer(start / "tokenizer.json")
    eos = eos_id(tokenizer)
    train = read_classification(out / "labelled.tsv", "sentence", "label")
    dev = read_classification(out / "dev.tsv", "sentence", "label")
    labels = sorted(set(train.labels))

    prompts = channel_prompts(args.channel, tokenizer, labels, eos)
    # Room in the context for what goes in front of each text: a leading EOS, or a channel prompt.
    in_front = 1 if args.leading_eos else max(map(len, prompts or []), default=0)

    def encode(texts):
        room = gpt.config.seq_len // 2 if args.echo else gpt.config.seq_len - in_front
        rows = [classification_input(e.ids, eos, room) for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
        if args.echo:
            return [r + r for r in rows]
        return [[eos, *r] for r in rows] if args.leading_eos else rows

    train_rows, dev_rows = encode(train.texts), encode(dev.texts)
    pool_rows = encode(read_classification(args.consistency, "sentence", "label").texts) if args.consistency else []
    train_y = torch.tensor([labels.index(x) for x in train.labels])
    dev_y = np.array([labels.index(x) for x in dev.labels])
    train_prior, dev_prior = ngram_priors(args.ngram_prior, train, dev, labels, args.seed)
    model = GPTClassifier(gpt, len(labels), "mean")
    if args.pooling != "mean" or args.channel or args.echo:
        model = pooled_or_channel(model, "echo" if args.echo else args.pooling, prompts)
    model.train()
    if args.freeze_embeddings:
        gpt.tok_emb.weight.requires_grad_(False)

    n_layer = len(gpt.blocks)

    def depth(name: str) -> int:  # 0 embeddings, i + 1 block i, n_layer + 1 the final norm and the head
        if "blocks." in name:
            return int(name.split("blocks.")[1].split(".")[0]) + 1
        return n_layer + 1 if name.startswith("head.") or "ln_f" in name else 0

    groups = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lr = args.lr * args.layer_decay ** (n_layer + 1 - depth(name))
        if name.startswith("head.") and args.head_lr:
            lr = args.head_lr
        groups.append({"params": [param], "lr": lr, "peak": lr, "weight_decay": 0.1 if param.ndim >= 2 else 0.0})
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95), eps=1e-8)
    batch = 32
    per_epoch = math.ceil(len(train_rows) / batch)
    total = per_epoch * args.epochs
    # Fine-tuning's schedule counted in steps: each group's peak times this factor.
    schedule = TrainSection(lr=1.0, min_lr_ratio=0.1, warmup_tokens=max(1, int(0.05 * total)), decay_tokens=total)

    averaged = [p.detach().clone() for p in model.parameters()] if args.ema else None

    def swap_average() -> None:  # the averaged weights in, the trained ones out (and back on the next call)
        for p, a in zip(model.parameters(), averaged):
            p.data, a.data = a.data, p.data

    @torch.no_grad()
    def accuracy() -> float:
        if averaged is not None:
            swap_average()
            try:
                return score()
            finally:
                swap_average()
        return score()

    def score() -> float:
        model.eval()
        predicted = []
        for i in range(0, len(dev_rows), 128):
            rows = dev_rows[i : i + 128]
            predicted.append((model(pad_right(rows, eos), torch.tensor([len(r) for r in rows]))
                              + dev_prior[i : i + 128]).argmax(-1))
        model.train()
        return float((torch.cat(predicted).numpy() == dev_y).mean())

    rng = np.random.default_rng(args.seed)
    step, best, stale, history, started = 0, 0.0, 0, [], time.perf_counter()
    for epoch in range(args.epochs):
        head_only = epoch < args.head_only_epochs
        for name, param in model.named_parameters():
            if not (args.freeze_embeddings and "tok_emb" in name):
                param.requires_grad_(name.startswith("head.") or not head_only)
        order = rng.permutation(len(train_rows))
        for b in range(per_epoch):
            idx = order[b * batch : (b + 1) * batch]
            rows = [drop_tokens(train_rows[i], args.token_dropout, rng) for i in idx]
            x, lengths = pad_right(rows, eos), torch.tensor([len(r) for r in rows])
            for group in optimizer.param_groups:
                group["lr"] = group["peak"] * learning_rate(step, schedule)
            if args.lm_weight > 0:
                h = gpt.hidden_states(x)
                real = (torch.arange(h.shape[1]) < lengths[:, None]).float()
                logits = model.head((h * real[..., None]).sum(1) / lengths[:, None])
                next_token = gpt.head(h[:, :-1], gpt.tok_emb.weight)
                targets = x[:, 1:].masked_fill(real[:, 1:] == 0, -100)
                loss = F.cross_entropy(logits, train_y[idx]) + args.lm_weight * F.cross_entropy(
                    next_token.reshape(-1, next_token.shape[-1]), targets.reshape(-1), ignore_index=-100)
            else:
                loss = F.cross_entropy(model(x, lengths) + train_prior[idx], train_y[idx])
            if pool_rows:
                loss = loss + args.uda_weight * consistency_loss(model, pool_rows, eos, rng, args)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if averaged is not None:
                torch._foreach_lerp_(averaged, [p.detach() for p in model.parameters()], 1.0 - args.ema)
            step += 1
        history.append(round(accuracy(), 4))
        best, stale = (history[-1], 0) if history[-1] > best else (best, stale + 1)
        if stale >= args.patience:
            break
    settings = {k: v for k, v in vars(args).items() if k not in ("run", "threads")}
    result = {"settings": settings, "best_dev_accuracy": best, "per_epoch": history,
              "seconds": round(time.perf_counter() - started, 1)}
    if args.ngram_prior:
        result["ngram_alone_dev_accuracy"] = round(float((dev_prior.argmax(-1).numpy() == dev_y).mean()), 4)
    return result


def ngram_priors(folds: int, train, dev, labels: list, seed: int):
    """`--ngram-prior`: the n-gram classifier's log-probabilities of the training rows (out of `folds`
    folds; the full fit's when `folds` is 1) and of the dev rows (the full fit's); zeros when 0."""
    import torch

    from mtnlg_ray.finetune.ngram import fit_ngram_classifier

    n = len(train.rows)
    if not folds:
        return torch.zeros(n, len(labels)), torch.zeros(len(dev.rows), len(labels))
    full = fit_ngram_classifier(train.texts, train.labels, labels, seed=seed)
    train_probs = full.predict_proba(train.texts)
    if folds > 1:
        for held in np.array_split(np.random.default_rng(seed).permutation(n), folds):
            rest = np.setdiff1d(np.arange(n), held)
            fold = fit_ngram_classifier([train.texts[i] for i in rest], [train.labels[i] for i in rest], labels,
                                        seed=seed)
            train_probs[held] = fold.predict_proba([train.texts[i] for i in held])
    dev_probs = full.predict_proba(dev.texts)
    as_logits = lambda p: torch.from_numpy(np.log(np.clip(p, 1e-9, 1.0))).float()  # noqa: E731
    return as_logits(train_probs), as_logits(dev_probs)


def consistency_loss(model, pool_rows, eos: int, rng, args):
    """UDA's term: KL(sharpened clean prediction || prediction on a noisy copy), over the confident rows,
    divided by the batch (so fewer confident rows weigh less)."""
    import torch
    import torch.nn.functional as F

    from mtnlg_ray.model.classifier import drop_tokens, pad_right

    rows = [pool_rows[i] for i in rng.integers(len(pool_rows), size=args.uda_batch)]
    with torch.no_grad():
        model.eval()
        clean = model(pad_right(rows, eos), torch.tensor([len(r) for r in rows]))
        model.train()
        confident = F.softmax(clean, dim=-1).amax(dim=-1) >= args.uda_threshold
        target = F.softmax(clean / args.uda_temperature, dim=-1)
    if not bool(confident.any()):
        return clean.new_zeros(())
    noisy_rows = [drop_tokens(rows[i], args.uda_dropout, rng) for i in confident.nonzero()[:, 0].tolist()]
    noisy = model(pad_right(noisy_rows, eos), torch.tensor([len(r) for r in noisy_rows]))
    kl = F.kl_div(F.log_softmax(noisy, dim=-1), target[confident], reduction="sum")
    return kl / len(rows)


def channel_prompts(words: str | None, tokenizer, labels: list, eos: int) -> list[list[int]] | None:
    """For `--channel`: the tokens that open a text under each label (EOS, then the label's word)."""
    if words is None:
        return None
    split = words.split(",")
    if len(split) != len(labels):
        raise SystemExit(f"--channel: {len(split)} words for {len(labels)} labels ({labels}); give one each")
    return [[eos, *tokenizer.encode(" " + w, add_special_tokens=False).ids] for w in split]


def pooled_or_channel(classifier, pooling: str, prompts: list[list[int]] | None):
    """`classifier` with max, mean+max or echo pooling (a new head), or (with prompts) the language model
    as a channel classifier.

    Called as the classifier is, on (B, T) right-padded rows that end in EOS and their lengths.
    """
    import torch
    import torch.nn.functional as F
    from torch import nn

    gpt = classifier.backbone

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = gpt
            width = gpt.config.d_model * (2 if pooling == "mean+max" else 1)
            self.head = nn.Linear(width, classifier.n_labels)
            with torch.no_grad():
                self.head.weight.normal_(0.0, gpt.config.init_std)
                self.head.bias.zero_()

        def forward(self, idx, lengths):
            if prompts is not None:
                return torch.stack([self.log_likelihood(prompt, idx, lengths) for prompt in prompts], dim=1)
            h = gpt.hidden_states(idx)
            real = torch.arange(h.shape[1])[None, :] < lengths[:, None]
            if pooling == "echo":  # rows are two equal copies: the mean over the second
                second = real & (torch.arange(h.shape[1])[None, :] >= (lengths // 2)[:, None])
                return self.head((h * second[..., None]).sum(dim=1) / (lengths - lengths // 2)[:, None])
            largest = h.masked_fill(~real[..., None], float("-inf")).amax(dim=1)
            if pooling == "max":
                return self.head(largest)
            mean = (h * real[..., None]).sum(dim=1) / lengths[:, None]
            return self.head(torch.cat([mean, largest], dim=-1))

        def log_likelihood(self, prompt, idx, lengths):
            """log p(row's text and closing EOS | prompt), per row."""
            B, P = idx.shape[0], len(prompt)
            x = torch.cat([torch.tensor(prompt).expand(B, P), idx], dim=1)
            logp = F.log_softmax(gpt(x)[:, P - 1 : -1], dim=-1)
            scored = logp.gather(-1, idx[..., None])[..., 0]
            real = torch.arange(idx.shape[1])[None, :] < lengths[:, None]
            return (scored * real).sum(dim=1)

    return Wrapped()


if __name__ == "__main__":
    main()
