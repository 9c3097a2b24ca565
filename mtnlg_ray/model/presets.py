"""Named model shapes: two small ones for tests and CPU demos, the GPT-3 family, and MT-NLG 530B.

A preset's `vocab_size` is the default; `mtnlg-ray init` replaces it with the tokenizer's
vocabulary padded to a multiple of 64.
"""

from __future__ import annotations

import torch

from mtnlg_ray.errors import ConfigError
from mtnlg_ray.model.gpt import GPT, GPTConfig

GPT2_VOCAB = 50304  # GPT-2's 50257 tokens padded to a multiple of 64

PRESETS: dict[str, GPTConfig] = {
    "tiny": GPTConfig(n_layer=4, n_head=4, d_model=128, seq_len=128, vocab_size=2048),
    "small": GPTConfig(n_layer=6, n_head=6, d_model=384, seq_len=256, vocab_size=8192),
    "gpt3-125m": GPTConfig(n_layer=12, n_head=12, d_model=768, seq_len=2048, vocab_size=GPT2_VOCAB),
    "gpt3-350m": GPTConfig(n_layer=24, n_head=16, d_model=1024, seq_len=2048, vocab_size=GPT2_VOCAB),
    "gpt3-760m": GPTConfig(n_layer=24, n_head=16, d_model=1536, seq_len=2048, vocab_size=GPT2_VOCAB),
    "gpt3-1.3b": GPTConfig(n_layer=24, n_head=16, d_model=2048, seq_len=2048, vocab_size=GPT2_VOCAB),
    "gpt3-2.7b": GPTConfig(n_layer=32, n_head=32, d_model=2560, seq_len=2048, vocab_size=GPT2_VOCAB),
    "gpt3-6.7b": GPTConfig(n_layer=32, n_head=32, d_model=4096, seq_len=2048, vocab_size=GPT2_VOCAB),
    "gpt3-13b": GPTConfig(n_layer=40, n_head=40, d_model=5120, seq_len=2048, vocab_size=GPT2_VOCAB),
    "gpt3-175b": GPTConfig(n_layer=96, n_head=96, d_model=12288, seq_len=2048, vocab_size=GPT2_VOCAB),
    # Smith et al. 2022: 105 layers, h 20480, 128 heads, vocab 50272 as padded in the paper.
    "mtnlg-530b": GPTConfig(n_layer=105, n_head=128, d_model=20480, seq_len=2048, vocab_size=50272),
}

# Pretraining's peak LR for each preset when `train.lr` is not given: the two CPU shapes' (tiny's,
# measured on the built-in corpus and tinyshakespeare; `small` kept beside it), GPT-3's per size
# (Brown et al. 2020, table 2.1) and MT-NLG's (Smith et al. 2022). One LR for every size was tiny's
# 3e-3, 15x what GPT-3 trained 1.3B with.
PRETRAIN_LR: dict[str, float] = {
    "tiny": 3e-3, "small": 3e-3,
    "gpt3-125m": 6e-4, "gpt3-350m": 3e-4, "gpt3-760m": 2.5e-4, "gpt3-1.3b": 2e-4, "gpt3-2.7b": 1.6e-4,
    "gpt3-6.7b": 1.2e-4, "gpt3-13b": 1e-4, "gpt3-175b": 6e-5, "mtnlg-530b": 5e-5,
}
assert PRETRAIN_LR.keys() == PRESETS.keys()

# Pretraining's warm-up for each preset when `train.warmup_tokens` is not given, in tokens: GPT-3's
# 375M for its sizes (Brown et al. 2020), MT-NLG's 1B, and 100,000 (about 24 steps of 32 x 128) for
# the two CPU shapes. A bounded run warms up over at most a tenth of its tokens (`WARMUP_SHARE`), so a
# 300-step laptop run of a GPT-3 size still leaves its warm-up; the same 100,000 for every preset
# gave gpt3-1.3b's 65,536-token batches under two steps of it.
PRETRAIN_WARMUP: dict[str, int] = {
    "tiny": 100_000, "small": 100_000, **{name: 375_000_000 for name in PRESETS if name.startswith("gpt3-")},
    "mtnlg-530b": 1_000_000_000,
}
WARMUP_SHARE = 10  # a bounded run warms up over at most 1/WARMUP_SHARE of its tokens
assert PRETRAIN_WARMUP.keys() == PRESETS.keys()


def get_preset(name: str) -> GPTConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"model.preset: unknown preset '{name}' (expected one of {', '.join(PRESETS)})") from None


def build_on_meta(config: GPTConfig) -> GPT:
    """The model with no storage behind its weights: for counting and planning 530B on a laptop."""
    with torch.device("meta"):
        return GPT(config)
