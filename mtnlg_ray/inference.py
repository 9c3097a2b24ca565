"""Text in, text out: a consolidated checkpoint and its tokenizer behind one object.

`TextGenerator` is what `mtnlg-ray generate` runs and what the Serve deployment holds per replica;
it turns prompts into token ids, runs the batched KV-cache decoder, and decodes text back,
holding back partial UTF-8 characters while streaming.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from mtnlg_ray.checkpoint import load_checkpoint, tokenizer_path
from mtnlg_ray.errors import CheckpointError, InputError
from mtnlg_ray.model.generate import Completion, SamplingParams, check_prompt, decode, generate
from mtnlg_ray.model.gpt import inference_layout
from mtnlg_ray.tokenizer import eos_id, load_tokenizer


class IncrementalText:
    """The text of a growing list of token ids, decoding only the ids since the last settled point.

    Byte-level BPE decodes a split list to the same text as the whole when the first part ends on a
    complete character (its text does not end in U+FFFD), so every `settle_every` ids the decoded
    tail is kept as settled text and later calls decode only what came after it. Streaming a long
    completion then costs time proportional to its length, not to its length squared.
    """

    def __init__(self, decode_ids: Callable[[Sequence[int]], str], settle_every: int = 16) -> None:
        self._decode = decode_ids
        self.ids: list[int] = []
        self._settled_text = ""
        self._settled_ids = 0
        self._settle_every = settle_every

    def extend(self, ids: Sequence[int]) -> str:
        """Add ids; return the text of all ids so far (ending in U+FFFD while a character is unfinished)."""
        self.ids.extend(ids)
        tail = self._decode(self.ids[self._settled_ids :])
        text = self._settled_text + tail
        if len(self.ids) - self._settled_ids >= self._settle_every and not tail.endswith("\ufffd"):
            self._settled_text, self._settled_ids = text, len(self.ids)
        return text


class TextGenerator:
    def __init__(self, checkpoint: str | Path, device: str = "cpu", dtype: torch.dtype | None = None) -> None:
        self.checkpoint = Path(checkpoint)
        self.model, self.meta = load_checkpoint(checkpoint, device=device, dtype=dtype)
        inference_layout(self.model)
        self.tokenizer = load_tokenizer(tokenizer_path(checkpoint))
        self.vocab = self.tokenizer.get_vocab_size()
        if self.vocab > self.model.config.vocab_size:
            raise CheckpointError(
                f"{self.checkpoint}: tokenizer has {self.vocab} tokens but the model only "
                f"{self.model.config.vocab_size} embeddings"
            )
        self.eos = eos_id(self.tokenizer)

    @property
    def context(self) -> int:
        return self.model.config.seq_len

    def encode(self, prompt: str) -> list[int]:
        # A command-line argument with bytes that are not UTF-8 arrives with them as lone surrogates,
        # which the tokenizer refuses with a TypeError.
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InputError(f"prompt: expected valid UTF-8 text, got an undecodable byte or lone surrogate "
                             f"at character {exc.start}") from None
        ids = self.tokenizer.encode(prompt).ids
        if not ids:
            raise InputError("prompt: expected some text, got an empty prompt")
        check_prompt(ids, self.context)
        return ids

    def decode_ids(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def complete(self, prompts: Sequence[str], params: SamplingParams | Sequence[SamplingParams]) -> list[tuple[str, Completion]]:
        """Text and raw completion for each prompt, decoded together in one batch."""
        encoded = [self.encode(p) for p in prompts]
        results = generate(self.model, encoded, params, eos_id=self.eos, vocab_limit=self.vocab)
        return [(self.decode_ids(r.tokens), r) for r in results]

    def stream(self, prompt: str, params: SamplingParams) -> Iterator[str]:
        """Pieces of text as they are generated; joined they equal `complete`'s text."""
        decoded = IncrementalText(self.decode_ids)
        shown = ""
        for step in decode(self.model, [self.encode(prompt)], params, eos_id=self.eos, vocab_limit=self.vocab):
            token = step[0]
            if token is None:
                break
            text = decoded.extend([token])
            # A byte-level token can end inside a UTF-8 character; wait for the rest of it.
            if text.endswith("\ufffd"):
                continue
            if len(text) > len(shown):
                yield text[len(shown) :]
                shown = text
        text = decoded.extend([])
        if len(text) > len(shown):
            yield text[len(shown) :]
