"""The GPT-3 / MT-NLG decoder as a plain `nn.Module`.

Pre-LayerNorm blocks, learned absolute positions, a GELU MLP of 4×d, biases everywhere,
tied input and output embeddings. Nothing here knows about Ray or torch.distributed:
parallelism is applied from outside (see `mtnlg_ray/train/parallel.py`).
"""

from __future__ import annotations

import hashlib
import math
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mtnlg_ray.errors import ConfigError


def initial_value(name: str, kind: str, shape: tuple[int, ...], std: float, seed: int) -> torch.Tensor:
    """The full initial value of one parameter, a function of the seed and its name only (CPU, fp32).

    "normal" draws N(0, std); "fan_in_uniform" draws U(-1/sqrt(fan_in), 1/sqrt(fan_in)), what
    `nn.Linear` gives its weight (a LoRA down-projection starts so).
    """
    if kind == "zeros":
        return torch.zeros(shape)
    if kind == "ones":
        return torch.ones(shape)
    digest = hashlib.blake2b(f"{seed}:{name}".encode("utf-8"), digest_size=8).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
    if kind == "fan_in_uniform":
        bound = 1.0 / math.sqrt(shape[-1])
        return torch.empty(shape).uniform_(-bound, bound, generator=generator)
    return torch.empty(shape).normal_(0.0, std, generator=generator)


def parameter_kinds(model: nn.Module) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name → (how it starts: "normal", "zeros", "ones" or "fan_in_uniform"; its full shape) for every
    parameter of `model` (a GPT or a task model around one), read off the modules: works on the meta
    device, nothing is allocated. Biases start at zero, LayerNorm gains at one, a LoRA adapter as
    LoRA prescribes (down-projection uniform, up-projection zero: the adapter adds nothing at first)."""
    kinds = {}
    for module_name, module in model.named_modules():
        for leaf, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{leaf}" if module_name else leaf
            if leaf in ("bias", "lora_b"):
                kind = "zeros"
            elif isinstance(module, nn.LayerNorm):
                kind = "ones"
            elif leaf == "lora_a":
                kind = "fan_in_uniform"
            else:
                kind = "normal"
            kinds[name] = (kind, tuple(param.shape))
    return kinds


def pad_vocab(n: int, multiple: int = 64) -> int:
    """Round a tokenizer's vocabulary up so the embedding splits evenly across tensor-parallel ranks."""
    return ((n + multiple - 1) // multiple) * multiple


@dataclass(frozen=True)
class GPTConfig:
    n_layer: int
    n_head: int
    d_model: int
    seq_len: int
    vocab_size: int
    dropout: float = 0.0
    activation_checkpointing: bool = False
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "d_model", "seq_len", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"model.{name}: expected a positive integer, got {getattr(self, name)}")
        if self.d_model % self.n_head:
            raise ConfigError(
                f"model.d_model: expected a multiple of model.n_head ({self.n_head}), got {self.d_model}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout: expected a value in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def init_std(self) -> float:
        # MT-NLG: sqrt(1 / (3h)), 0.004 at h = 20480.
        return math.sqrt(1.0 / (3.0 * self.d_model))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown model key '{unknown[0]}' (expected one of {sorted(known)})")
        missing = [f.name for f in fields(cls) if f.name not in data and f.default is MISSING]
        if missing:
            raise ConfigError(f"{source}: missing model key '{missing[0]}'")
        return cls(**data)



class KVCache:
    """Keys and values of every layer for a batch of sequences, preallocated to `max_len`.

    Rows are left-padded, so every row writes its next token at the same index (`length`);
    `key_valid` marks which slots hold real tokens. The serving engine's paged cache
    (`model/paged.py`) offers attention the same `update` and `length`.
    """

    def __init__(self, config: GPTConfig, batch: int, max_len: int, device, dtype) -> None:
        shape = (config.n_layer, batch, config.n_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.key_valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.length = 0
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one layer's new keys and values (B, T, heads, head_dim) at `length`; return all of
        that layer's keys and values so far, (B, heads, length + T, head_dim)."""
        start, end = self.length, self.length + k.shape[1]
        self.k[layer, :, :, start:end] = k.transpose(1, 2)
        self.v[layer, :, :, start:end] = v.transpose(1, 2)
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        # One fused projection laid out head by head ([head][q|k|v][head_dim] along the output),
        # so a column-parallel split hands each tensor-parallel rank whole heads.
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.dropout = config.dropout
        self.tp_rank: int | None = None  # set under tensor parallelism: this rank's heads drop on their own

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.qkv(x).view(B, T, -1, 3, self.head_dim)
        q, k, v = qkv.unbind(dim=3)  # each (B, T, heads, head_dim)
        q = q.transpose(1, 2)
        if cache is None:
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        else:  # store the new keys, attend over every key of the sequence so far
            k, v = cache.update(layer, k, v)
        dropout = self.dropout if self.training else 0.0
        with rank_local_rng(self.tp_rank if dropout > 0 else None):
            if attn_mask is None:
                # No mask means plain causal attention over a sequence that starts at position 0,
                # or one new token that may see every cached key. This keeps SDPA on its flash kernels.
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=T > 1)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


@contextmanager
def rank_local_rng(rank: int | None) -> Iterator[None]:
    """Random numbers of this tensor-parallel rank's own inside (nothing changes when `rank` is None).

    Dropout on what each tp rank holds alone (its heads, its sequence positions) must differ between
    ranks, or every shard repeats one mask pattern; dropout on what they all hold must not. The seed
    is drawn from the shared generator, which advances alike on every rank and which activation
    checkpointing restores before it recomputes a block, so a recomputed mask is the one of the
    forward pass; the shared generators are as they were afterwards but for that draw.
    """
    if rank is None:
        yield
        return
    seed = int(torch.randint(0, 2**62, (1,)))
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed + rank)
        yield


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.d_model, 4 * config.d_model)
        self.fc2 = nn.Linear(4 * config.d_model, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)
        # Set under sequence parallelism, where the residual stream holds this tp rank's positions only.
        self.sequence_rank: int | None = None

    def forward(self, x, cache=None, layer=0, attn_mask=None):
        attn = self.attn(self.ln1(x), cache, layer, attn_mask)
        # Dropout only when it does something: a no-op module call per block costs decode steps time.
        if self.training and self.drop.p > 0:
            with rank_local_rng(self.sequence_rank):
                x = x + self.drop(attn)
            mlp = self.mlp(self.ln2(x))
            with rank_local_rng(self.sequence_rank):
                return x + self.drop(mlp)
        x = x + attn
        return x + self.mlp(self.ln2(x))


class TiedHead(nn.Module):
    """The LM head: logits from the token embedding's own weight (tied, so it has no parameters).

    A module of its own only so a tensor-parallel plan can reach its input and output: sharded on
    the vocabulary like the embedding, it makes each rank's slice of the logits.
    """

    def forward(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(h, weight)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        # Handing nn.Embedding its (uninitialised) storage skips its own init, which on the meta
        # device would pull in hundreds of modules; reset_parameters below initialises everything.
        V, S, d = config.vocab_size, config.seq_len, config.d_model
        self.tok_emb = nn.Embedding(V, d, _weight=torch.empty(V, d))
        self.pos_emb = nn.Embedding(S, d, _weight=torch.empty(S, d))
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.head = TiedHead()
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    def reset_parameters(self, seed: int | None = None) -> None:
        """Normal(0, sqrt(1/(3h))) weights, zero biases, unit LayerNorms.

        With a seed, each parameter's values come from the seed and its name alone
        (`initial_value`), so a parallel layout that builds every shard separately gets the same
        full weights as this one process does.
        """
        std = self.config.init_std
        with torch.no_grad():
            for name, (kind, shape) in self.parameter_kinds().items():
                param = self.get_parameter(name)
                if seed is not None:
                    param.copy_(initial_value(name, kind, shape, std, seed))
                elif kind == "normal":
                    param.normal_(0.0, std)  # from torch's global generator, in registration order
                elif kind == "fan_in_uniform":
                    bound = 1.0 / math.sqrt(shape[-1])
                    param.uniform_(-bound, bound)
                else:
                    param.fill_(1.0 if kind == "ones" else 0.0)

    def parameter_kinds(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return parameter_kinds(self)

    def num_parameters(self) -> int:
        # The output projection is the input embedding (tied), so it is counted once.
        return sum(p.numel() for p in self.parameters())

    def hidden_states(
        self,
        idx: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-LayerNorm hidden states (B, T, d_model): what the LM head and task heads read.

        A pipeline stage (see `pipeline_part`) runs only the pieces it holds: the embeddings if it is
        the first (else `idx` are the previous stage's hidden states), its blocks, and the final
        LayerNorm if it is the last.
        """
        T = idx.shape[1]
        start = cache.length if cache is not None else 0
        if self.pos_emb is not None:
            if positions is None:
                if start + T > self.config.seq_len:
                    raise ValueError(f"sequence of {start + T} tokens exceeds the context of {self.config.seq_len}")
                positions = torch.arange(start, start + T, device=idx.device)
            elif int(positions.max()) >= self.config.seq_len:  # left-padded rows: slots run ahead of positions
                raise ValueError(f"position {int(positions.max())} is past the context of {self.config.seq_len}")
            x = self.tok_emb(idx) + self.pos_emb(positions)
            if self.training and self.drop.p > 0:
                x = self.drop(x)
        else:
            x = idx
        recompute = self.config.activation_checkpointing and self.training and cache is None
        for i, block in enumerate(self.blocks):
            if block is None:  # another pipeline stage's layer
                continue
            if recompute:
                x = checkpoint(block, x, None, i, attn_mask, use_reentrant=False)
            else:
                x = block(x, cache, i, attn_mask)
        if cache is not None:
            cache.length += T
        return self.ln_f(x) if self.ln_f is not None else x

    def forward(
        self,
        idx: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        attn_mask: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits (B, T, vocab_size) over the padded vocabulary; (B, 1, vocab_size) with `last_only`.

        `last_only` is for generation: only the last position's logits are needed, and skipping the
        rest saves a (T x vocab) product and its memory on every prompt.
        """
        h = self.hidden_states(idx, positions, cache, attn_mask)
        if self.ln_f is None:  # a pipeline stage before the last: its output is the next one's input
            return h
        if last_only:
            h = h[:, -1:]
        return self.head(h, self.tok_emb.weight)


def pipeline_part(model: GPT, layers: range, first: bool, last: bool) -> GPT:
    """`model` cut down, in place, to one pipeline stage: the blocks in `layers`, the embeddings on the
    first stage, the final LayerNorm and LM head on the last. The last stage keeps the token embedding
    too, as the tied LM head's weight (Megatron's second copy, whose gradient the two stages share).
    Names stay those of the whole model (`blocks.7...`), so checkpoints move between layouts."""
    for i in range(len(model.blocks)):
        if i not in layers:
            model.blocks[i] = None
    if not first:
        model.pos_emb = None
        if not last:
            model.tok_emb = None
    if not last:
        model.ln_f = None
    return model


def inference_layout(model: GPT) -> GPT:
    """Store every Linear weight (out, in), and the tied token embedding, column-major, in place.

    `F.linear` multiplies by the weight transposed; with the weight column-major that transpose is a
    plain row-major (in, out) matrix, which CPU GEMM kernels stream faster for the few rows of a
    decode step (the LM head is the biggest of them; looking up a few embedding rows stays cheap).
    Values, names and shapes stay the same, so outputs are unchanged. For serving only: optimizers
    and checkpoint writers expect contiguous parameters. Returns `model`.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) or module is model.tok_emb:
                module.weight.data = module.weight.data.t().contiguous().t()
    return model


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy; `targets` are the inputs shifted left by one."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=ignore_index
    )
