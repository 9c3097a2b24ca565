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


def get_preset(name: str) -> GPTConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"model.preset: unknown preset '{name}' (expected one of {', '.join(PRESETS)})") from None


def build_on_meta(config: GPTConfig) -> GPT:
    """The model with no storage behind its weights: for counting and planning 530B on a laptop."""
    with torch.device("meta"):
        return GPT(config)
