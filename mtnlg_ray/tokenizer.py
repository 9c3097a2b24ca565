"""GPT-2 byte-level BPE tokenizer, trained and loaded with HF `tokenizers`.

`mtnlg-ray tokenizer train` writes `tokenizer.json`; packing, training, generation and
serving load it with `load_tokenizer`, and the dataset manifest records `tokenizer_hash`.

Every UTF-8 string round-trips: `tok.decode(tok.encode(s).ids) == s`. The end-of-text
token `EOS` enters a sequence only by id (`eos_id`), where the packer puts it between
documents: a tokenizer from `load_tokenizer` encodes the literal text "<|endoftext|>" as
ordinary bytes, so a document that quotes it cannot end itself early (tiktoken does the
same by default). That setting is not saved in tokenizer.json; `Tokenizer.from_file` and
transformers map the literal text to EOS, as GPT-2 does. `decode` drops EOS unless given
`skip_special_tokens=False`, which writes it as the literal text.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from mtnlg_ray.data.read import iter_texts
from mtnlg_ray.errors import CheckpointError, ConfigError, InputError
from mtnlg_ray.publish import check_can_make_folder, publish_file

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
# 256 byte tokens, EOS, and at least one merge: anything less is not BPE.
MIN_VOCAB_SIZE = 258
# The trainer reserves room for every token asked for before it reads any text (about 70 bytes a
# token): 10^9 tokens aborted the whole process in Rust, and a size past 2^64 was an OverflowError.
# No GPT vocabulary comes near 2^20 (GPT-2 has 50,257 tokens; the largest in use about 256K).
MAX_VOCAB_SIZE = 2**20


def train_tokenizer(
    inputs: Sequence[str], vocab_size: int, output: str | Path, show_progress: bool = True
) -> Path:
    """Train a byte-level BPE of `vocab_size` tokens on INPUTs; return `output/tokenizer.json`.

    The vocabulary holds EOS (id 0), the 256 byte tokens, then merges in the order learnt.
    It comes out smaller than `vocab_size` when the text has fewer distinct pairs to merge.
    The file is written atomically, so a crash never leaves a half-written tokenizer.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(
            f"tokenizer.vocab_size: {vocab_size} is too small, expected at least "
            f"{MIN_VOCAB_SIZE} (256 bytes, {EOS} and one merge)"
        )
    if vocab_size > MAX_VOCAB_SIZE:
        raise ConfigError(f"tokenizer.vocab_size: {vocab_size} is too large, expected at most {MAX_VOCAB_SIZE:,}")
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise InputError(f"{output}: output must be a folder, not a file")
    check_can_make_folder(output)
    texts = _CountedTexts(iter_texts(inputs))

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Affects offsets only: a token's span keeps its leading space, as in GPT-2's own file.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if texts.documents == 0:
        raise InputError(f"no text found in {' '.join(inputs)}")
    if tok.get_vocab_size() < vocab_size:
        log.warning(
            "vocabulary has %d tokens, fewer than the %d asked for: the text ran out of pairs",
            tok.get_vocab_size(),
            vocab_size,
        )

    output.mkdir(parents=True, exist_ok=True)
    path = output / TOKENIZER_FILE
    publish_file(path, tok.to_str())
    log.info("trained %d tokens on %d documents: %s", tok.get_vocab_size(), texts.documents, path)
    return path


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer from `tokenizer.json` or a folder holding one.

    Literal "<|endoftext|>" in text encodes as plain bytes (see the module docstring).
    Raises `CheckpointError` naming the file when it is missing, unreadable, or lacks EOS
    as a special token.
    """
    file = _tokenizer_file(path)
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as err:  # the Rust side raises a bare Exception for every parse error
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{file}: not a valid tokenizer.json ({reason})") from None
    if not any(t.content == EOS and t.special for t in tok.get_added_tokens_decoder().values()):
        raise CheckpointError(f"{file}: tokenizer has no {EOS} special token")
    largest = max(tok.get_vocab(with_added_tokens=True).values(), default=-1)
    if largest + 1 != tok.get_vocab_size(with_added_tokens=True):
        # Every reader sizes embeddings and token storage by the count; a gap would put ids past it.
        raise CheckpointError(
            f"{file}: token ids must run from 0 without gaps ({tok.get_vocab_size()} tokens, largest id {largest})"
        )
    tok.encode_special_tokens = True
    return tok


def eos_id(tok: Tokenizer) -> int:
    """The id of the end-of-text token that separates documents."""
    token_id = tok.token_to_id(EOS)
    if token_id is None:
        raise CheckpointError(f"tokenizer has no {EOS} token")
    return token_id


def tokenizer_hash(path: str | Path) -> str:
    """First 16 hex digits of the sha256 of `tokenizer.json` (a file, or a folder holding it)."""
    file = _tokenizer_file(path)
    try:
        return hashlib.sha256(file.read_bytes()).hexdigest()[:16]
    except OSError as err:
        raise CheckpointError(f"{file}: cannot read tokenizer ({err.strerror})") from None


def _tokenizer_file(path: str | Path) -> Path:
    file = Path(path)
    if file.is_dir():
        file = file / TOKENIZER_FILE
    if not file.is_file():
        raise CheckpointError(f"{file}: no such file (`mtnlg-ray tokenizer train` writes one)")
    return file


class _CountedTexts:
    """Passes texts through to the trainer, counting them, to tell "no text" apart."""

    def __init__(self, texts: Iterator[str]) -> None:
        self._texts = texts
        self.documents = 0

    def __iter__(self) -> Iterator[str]:
        for text in self._texts:
            self.documents += 1
            yield text
