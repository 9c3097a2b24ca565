"""The GPT model, its presets, generation, and FLOP / memory planning. No Ray or torch.distributed here."""

from mtnlg_ray.model.gpt import GPT, GPTConfig, KVCache, lm_loss, pad_vocab
from mtnlg_ray.model.presets import PRESETS, build_on_meta, get_preset

__all__ = ["GPT", "GPTConfig", "KVCache", "PRESETS", "build_on_meta", "get_preset", "lm_loss", "pad_vocab"]
