"""The tasks the one training loop trains, by name: the language model (pretraining) here, and the
fine-tuning tasks (`mtnlg_ray.finetune.tasks`). A stage picks one by name; the loop only calls it.

A task knows its examples (`__len__`, `tokens`, `flops`, `mean_flops_per_token`), wraps the GPT
(`build`), computes a micro-batch's loss, evaluates (`evaluate`, when `eval_every_steps` says or at the end of each epoch), keeps the best
dev checkpoint or not (`keeps_best`) and writes a consolidated checkpoint of its model (`save`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from mtnlg_ray.config import Config
from mtnlg_ray.model.flops import flops_per_token
from mtnlg_ray.model.gpt import GPT, GPTConfig, lm_loss
from mtnlg_ray.train.data import TokenShards, rank_slice
from mtnlg_ray.train.parallel import loss_parallel_context, mean_over_dp, plain


class LMTask:
    """Pretraining: next-token loss on the packed token shards of a dataset from `data prepare`."""

    kind = "lm"
    keeps_best = False  # the last weights are the result; the held-out loss is only followed

    def __init__(self, cfg: Config, tokenizer_file: Path | None, model_config: GPTConfig) -> None:
        self.cfg = cfg
        self.train = TokenShards(cfg.data.path, "train")
        self.val = TokenShards(cfg.data.path, "val")
        self.seq_len = self.train.seq_len
        self.model_config = model_config
        self.eval_every_steps = cfg.train.eval_every

    def __len__(self) -> int:
        return len(self.train)

    def tokens(self, indices: np.ndarray) -> int:
        return len(indices) * self.seq_len

    def flops(self, indices: np.ndarray) -> float:
        """Model FLOPs of training on these examples (the MFU numerator)."""
        return len(indices) * self.seq_len * self.mean_flops_per_token()

    def mean_flops_per_token(self) -> float:
        return flops_per_token(self.model_config, self.seq_len)

    def build(self, backbone: GPT, init_head=None) -> nn.Module:
        return backbone

    def inputs_targets(self, shards: TokenShards, indices: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
        rows = shards.rows(indices).to(device)
        return rows[:, :-1], rows[:, 1:]

    def loss(self, model: nn.Module, indices: np.ndarray, device) -> torch.Tensor:
        inputs, targets = self.inputs_targets(self.train, indices, device)
        return lm_loss(model(inputs), targets)

    @staticmethod
    def pipeline_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The loss of one micro-batch from the last stage's output (a pipeline schedule's `loss_fn`).

        A copy: under tensor parallelism `plain` gives a view of the gathered loss, and the zero-bubble
        schedule detaches each stage output in place, which a view refuses (pp2 x tp2 died on step 1)."""
        return plain(lm_loss(logits, targets)).clone()

    def eval_indices(self, batch: int, mesh=None) -> np.ndarray:
        """This rank's held-out sequences: an equal share of `eval_batches` micro-batches a dp rank,
        spread evenly over the whole split (which follows the corpus, its sources in order), or, when
        there are fewer held-out sequences than ranks, all of them everywhere (every rank must run the
        same number of forwards: FSDP gathers weights in each one)."""
        dp = mesh["dp"].size() if mesh is not None else 1
        dp_rank = mesh["dp"].get_local_rank() if mesh is not None else 0
        wanted = batch * self.cfg.train.eval_batches
        count = min(len(self.val), wanted * dp) // dp * dp
        spread = np.arange(count) * len(self.val) // max(count, 1)  # strictly increasing: count <= len
        return rank_slice(spread, dp_rank, dp) if count else np.arange(len(self.val))[:wanted]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device, batch: int, mesh=None) -> dict | None:
        """{"loss": mean loss over `eval_batches` micro-batches spread over the held-out split, across dp ranks}."""
        if len(self.val) == 0:
            return None
        model.eval()
        mine = self.eval_indices(batch, mesh)
        total = torch.zeros((), device=device)
        for start in range(0, len(mine), batch):
            rows = self.val.rows(mine[start : start + batch]).to(device)
            with loss_parallel_context(mesh):  # a short last micro-batch weighs by its sequences, not as a whole one
                total += plain(lm_loss(model(rows[:, :-1]), rows[:, 1:])) * len(rows)
        return {"loss": mean_over_dp(total / len(mine), mesh)}  # every rank holds as many sequences

    def save(self, state: dict, model_config: GPTConfig, output: Path, tokenizer_json: Path, extra: dict) -> Path:
        from mtnlg_ray.checkpoint import save_state_dict

        return save_state_dict(state, model_config, output, tokenizer_json=tokenizer_json, extra=extra)


def make_task(kind: str, cfg: Config, model_config: GPTConfig, tokenizer_file: Path | None):
    """The task named `kind`: "lm" (pretraining), or a fine-tuning `task.kind`."""
    from mtnlg_ray.finetune.tasks import TASKS

    tasks = {"lm": LMTask, **TASKS}
    return tasks[kind](cfg, tokenizer_file, model_config)
