"""What fine-tuning trains, for the one training loop (`mtnlg_ray/train/loop.py`).

A task turns the labelled files into token rows, wraps the GPT for its objective (a classification
head, LoRA adapters, a frozen backbone), computes the loss of a micro-batch, scores the dev set and
writes the final consolidated checkpoint (LoRA merged). The loop handles everything else: the mesh,
parallelism, the schedule, checkpoints and resuming. Every rank scores the whole dev set, so all
ranks run the same forwards (FSDP and tensor parallelism need that) and agree on the result.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mtnlg_ray.checkpoint import save_classifier
from mtnlg_ray.config import Config
from mtnlg_ray.finetune.data import check_labels, read_classification, read_sft
from mtnlg_ray.finetune.metrics import classification_metrics
from mtnlg_ray.model.classifier import GPTClassifier, classification_input, drop_tokens, pad_right
from mtnlg_ray.model.flops import sequence_flops
from mtnlg_ray.model.gpt import GPT, GPTConfig, lm_loss
from mtnlg_ray.model.lora import apply_lora, merge_lora
from mtnlg_ray.tokenizer import eos_id, load_tokenizer

# Higher is better for these dev metrics; lower for the rest (losses).
HIGHER_IS_BETTER = {"accuracy", "macro_f1", "exact_match"}


def _adapt(model: nn.Module, backbone: GPT, cfg: Config) -> nn.Module:
    """Full fine-tuning, LoRA on the backbone, or a frozen backbone; a task head stays trainable."""
    mode, lora = cfg.task.mode, cfg.task.lora
    if mode == "lora":
        apply_lora(backbone, lora.rank, lora.alpha, lora.dropout, lora.targets)
    elif mode == "frozen":
        backbone.requires_grad_(False)
    return model


def _merged_model(task, state: dict[str, torch.Tensor], model_config: GPTConfig) -> nn.Module:
    """The task's model rebuilt on the CPU from a gathered state dict, LoRA folded in: what checkpoints hold."""
    with torch.device("meta"):
        skeleton = task.build(GPT(model_config))
    skeleton.to_empty(device="cpu")
    skeleton.load_state_dict(state)
    return merge_lora(skeleton)


def sequence_multiple(cfg: Config) -> int:
    """What a batch's length must be a multiple of: tp under sequence parallelism, else anything."""
    return cfg.parallel.tp if cfg.parallel.sequence_parallel else 1


class ClassificationTask:
    """A head on the pooled last hidden state; cross-entropy against hard or soft labels."""

    kind = "classification"
    keeps_best = True  # the final checkpoint is the best on the dev set
    eval_every_steps = None  # at the end of every epoch

    def __init__(self, cfg: Config, tokenizer_file: Path, model_config: GPTConfig) -> None:
        self.cfg = cfg
        self.labels = list(cfg.task.labels or [])
        tokenizer = load_tokenizer(tokenizer_file)
        self.eos = eos_id(tokenizer)
        self.seq_len = model_config.seq_len
        self.model_config = model_config
        self.multiple = sequence_multiple(cfg)
        train = read_classification(cfg.data.train, cfg.data.text_field, cfg.data.label_field)
        check_labels(train, self.labels, "data.train")
        self.train_rows = self._encode(tokenizer, train.texts)
        index = {label: i for i, label in enumerate(self.labels)}
        self.targets = np.zeros((len(train.rows), len(self.labels)), dtype=np.float32)
        for i, row in enumerate(train.rows):
            if row.probs is not None:
                self.targets[i] = np.asarray(row.probs, dtype=np.float32) / max(sum(row.probs), 1e-12)
            else:
                self.targets[i, index[row.label]] = 1.0
        self.step = 0  # see begin_step
        self.dev_rows, self.dev_gold = [], []
        if cfg.data.dev:
            dev = read_classification(cfg.data.dev, cfg.data.text_field, cfg.data.label_field)
            check_labels(dev, self.labels, "data.dev")
            self.dev_rows = self._encode(tokenizer, dev.texts)
            self.dev_gold = [index[label] for label in dev.labels]

    def _encode(self, tokenizer, texts: list[str]) -> list[list[int]]:
        encoded = tokenizer.encode_batch(texts, add_special_tokens=False)
        return [classification_input(e.ids, self.eos, self.seq_len) for e in encoded]

    def __len__(self) -> int:
        return len(self.train_rows)

    @cached_property
    def lengths(self) -> np.ndarray:
        """Each training example's tokens, for length-grouped batches (train.group_by_length) and FLOPs."""
        return np.array([len(row) for row in self.train_rows])

    def tokens(self, indices: np.ndarray) -> int:
        return int(sum(len(self.train_rows[i]) for i in indices))

    def flops(self, indices: np.ndarray) -> float:
        """Model FLOPs of training on these examples as this step reads them (after token dropout, which
        `begin_step` seeds): pooled hidden states, no vocabulary logits."""
        lengths = [len(row) for row in self.noisy_rows(indices)]
        return sequence_flops(self.model_config, lengths, lm_head=False, mode=self.cfg.task.mode)

    def mean_flops_per_token(self) -> float:
        """Over the whole training set, before token dropout (the `start` event's figure)."""
        flops = sequence_flops(self.model_config, self.lengths, lm_head=False, mode=self.cfg.task.mode)
        return flops / max(int(self.lengths.sum()), 1)

    def build(self, backbone: GPT, init_head: dict[str, torch.Tensor] | None = None) -> nn.Module:
        model = GPTClassifier(backbone, len(self.labels), self.cfg.task.pooling)
        if init_head is not None:
            model.head.load_state_dict(init_head)
        return _adapt(model, backbone, self.cfg)

    def _inputs(self, rows: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_right(rows, self.eos, self.multiple).to(device), torch.tensor([len(r) for r in rows], device=device)

    def begin_step(self, step: int) -> None:
        self.step = step

    def noisy_rows(self, indices: np.ndarray) -> list[list[int]]:
        """The training rows at `indices` with task.token_dropout applied. Each example's dropped tokens
        come from the seed, the step and its index alone: the same whatever the layout or micro-batch,
        and a resumed run drops what the uninterrupted one did."""
        rate = self.cfg.task.token_dropout
        if rate <= 0:
            return [self.train_rows[i] for i in indices]
        return [drop_tokens(self.train_rows[i], rate, np.random.default_rng([self.cfg.train.seed, self.step, int(i)]))
                for i in indices]

    def loss(self, model: nn.Module, indices: np.ndarray, device) -> torch.Tensor:
        rows = self.noisy_rows(indices)
        idx, lengths = self._inputs(rows, device)
        logits = model(idx, lengths).float()
        return F.cross_entropy(logits, torch.from_numpy(self.targets[indices]).to(device))

    @torch.no_grad()
    def predict(self, model: nn.Module, rows: list[list[int]], device, batch: int) -> np.ndarray:
        out = []
        for start in range(0, len(rows), batch):
            idx, lengths = self._inputs(rows[start : start + batch], device)
            out.append(model(idx, lengths).float().argmax(dim=-1).cpu())
        return torch.cat(out).numpy()

    def evaluate(self, model: nn.Module, device, batch: int, mesh=None) -> dict | None:
        if not self.dev_rows:
            return None
        model.eval()
        predicted = self.predict(model, self.dev_rows, device, batch)
        return classification_metrics(self.dev_gold, predicted, self.labels)

    def save(self, state: dict, model_config: GPTConfig, output: Path, tokenizer_json: Path, extra: dict) -> Path:
        model = _merged_model(self, state, model_config)
        return save_classifier(model, self.labels, output, tokenizer_json, extra=extra)


def sft_input(tokenizer, pair, eos: int, seq_len: int) -> tuple[list[int], int]:
    """One SFT pair's tokens and the index of its first completion token (see `SFTTask._encode`);
    the default schedule counts a run's tokens with it too."""
    prompt = tokenizer.encode(pair.prompt, add_special_tokens=False).ids or [eos]
    completion = [*tokenizer.encode(pair.completion, add_special_tokens=False).ids, eos]
    completion = completion[:seq_len]
    prompt = prompt[max(0, len(prompt) - (seq_len + 1 - len(completion))) :]
    return [*prompt, *completion], len(prompt)


class SFTTask:
    """Prompt/completion pairs; the loss covers the completion (and its closing EOS) only."""

    kind = "sft"
    keeps_best = True
    eval_every_steps = None

    def __init__(self, cfg: Config, tokenizer_file: Path, model_config: GPTConfig) -> None:
        self.cfg = cfg
        tokenizer = load_tokenizer(tokenizer_file)
        self.eos = eos_id(tokenizer)
        self.vocab = tokenizer.get_vocab_size()  # ids past it are the embedding's padding
        self.seq_len = model_config.seq_len
        self.model_config = model_config
        self.multiple = sequence_multiple(cfg)
        fields = (cfg.task.prompt_field, cfg.task.completion_field)
        self.train = [self._encode(tokenizer, p) for p in read_sft(cfg.data.train, *fields)]
        self.dev = [self._encode(tokenizer, p) for p in read_sft(cfg.data.dev, *fields)] if cfg.data.dev else []

    def _encode(self, tokenizer, pair) -> tuple[list[int], int]:
        """(tokens, index of the first completion token); a long prompt loses its beginning, and a
        completion longer than the context keeps its first seq_len tokens, without its EOS.

        An empty prompt is an EOS, as a document starts after one in pretraining: the completion's
        first token is then trained (predicted from the EOS, as greedy scoring predicts it), where it
        used to be an input only."""
        return sft_input(tokenizer, pair, self.eos, self.seq_len)

    def __len__(self) -> int:
        return len(self.train)

    @cached_property
    def lengths(self) -> np.ndarray:
        return np.array([len(ids) for ids, _ in self.train])

    def tokens(self, indices: np.ndarray) -> int:
        return int(sum(len(self.train[i][0]) for i in indices))

    def flops(self, indices: np.ndarray) -> float:
        """Model FLOPs of training on these examples, each read as its tokens but the last."""
        return sequence_flops(self.model_config, self.lengths[indices] - 1, mode=self.cfg.task.mode)

    def mean_flops_per_token(self) -> float:
        inputs = self.lengths - 1
        return sequence_flops(self.model_config, inputs, mode=self.cfg.task.mode) / max(int(inputs.sum()), 1)

    def build(self, backbone: GPT, init_head=None) -> nn.Module:
        if self.cfg.task.mode == "frozen":
            from mtnlg_ray.errors import ConfigError

            raise ConfigError("task.mode=frozen leaves nothing to train for task.kind=sft; use full or lora")
        return _adapt(backbone, backbone, self.cfg)

    def _batch(self, examples, device) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = pad_right([ids[:-1] for ids, _ in examples], self.eos, self.multiple)
        targets = pad_right([ids[1:] for ids, _ in examples], -100, self.multiple)
        for row, (_, start) in enumerate(examples):
            targets[row, : max(start - 1, 0)] = -100  # predictions of prompt tokens are not trained
        return inputs.to(device), targets.to(device)

    def loss(self, model: nn.Module, indices: np.ndarray, device) -> torch.Tensor:
        inputs, targets = self._batch([self.train[i] for i in indices], device)
        return lm_loss(model(inputs), targets)

    def _targets(self, index: int) -> int:
        """How many of an example's tokens the loss predicts: its completion and closing EOS."""
        ids, start = self.train[index]
        return len(ids) - max(start, 1)

    def loss_scales(self, micro_batches: list[np.ndarray], step: np.ndarray, dp: int) -> list[float]:
        """What each of this rank's micro-batch mean losses is multiplied by so the step's gradient is
        the mean over every completion token of the global batch (`step`, all ranks' examples), whatever
        the micro-batch size and dp: its share of those tokens, times dp, which the gradient reduction
        divides by. (An equal weight a micro-batch would let one with 1 completion token count as much
        as one with 500.)"""
        total = max(1, sum(map(self._targets, step)))
        return [sum(map(self._targets, micro)) * dp / total for micro in micro_batches]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device, batch: int, mesh=None) -> dict | None:
        if not self.dev:
            return None
        model.eval()
        total, count, exact = 0.0, 0, 0
        for start in range(0, len(self.dev), batch):
            examples = self.dev[start : start + batch]
            inputs, targets = self._batch(examples, device)
            logits = model(inputs).float()
            mask = targets != -100
            total += float(F.cross_entropy(logits[mask], targets[mask], reduction="sum"))
            count += int(mask.sum())
            exact += self._exact_matches(model, examples, device)
        return {"n": len(self.dev), "loss": total / max(count, 1), "exact_match": exact / len(self.dev)}

    def _exact_matches(self, model: nn.Module, examples, device) -> int:
        """How many examples greedy decoding from the prompt completes exactly as the reference does."""
        answers = self.greedy_completions(model, examples, device)
        return sum(answer == ids[start:] for answer, (ids, start) in zip(answers, examples))

    def greedy_completions(self, model: nn.Module, examples, device) -> list[list[int]]:
        """Greedy decoding from each prompt, as many tokens as its reference completion, over the
        tokenizer's vocabulary (the embedding's padding past it is no token).

        Whole-sequence forwards without a KV cache: they work under FSDP and tensor parallelism, and
        every rank decodes the same steps. Right padding is harmless because attention is causal.
        """
        prompts = [ids[:start] or [self.eos] for ids, start in examples]
        wanted = [ids[start:] for ids, start in examples]
        rows = [list(p) for p in prompts]
        for _ in range(max(len(w) for w in wanted)):
            inputs = pad_right([r[-self.seq_len:] for r in rows], self.eos, self.multiple).to(device)
            last = torch.tensor([min(len(r), self.seq_len) - 1 for r in rows], device=device)
            logits = model(inputs)[torch.arange(len(rows), device=device), last, : self.vocab]
            for row, token in zip(rows, logits.argmax(dim=-1).tolist()):
                row.append(token)
        return [r[len(p) : len(p) + len(w)] for r, p, w in zip(rows, prompts, wanted)]

    def save(self, state: dict, model_config: GPTConfig, output: Path, tokenizer_json: Path, extra: dict) -> Path:
        from mtnlg_ray.checkpoint import save_checkpoint

        return save_checkpoint(_merged_model(self, state, model_config), output, tokenizer_json, extra=extra)


TASKS = {"classification": ClassificationTask, "sft": SFTTask}
