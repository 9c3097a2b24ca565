"""Language identification for the corpus pipeline (`lang.keep: [en, ...]`): langid.py's naive Bayes
model over byte n-grams (97 languages, shipped inside the package, so nothing is downloaded).

Every document gets a `language` column; one outside `lang.keep`, or identified with a probability
under `lang.min_confidence`, is rejected with reason `language` and the language and probability in
`detail`. Runs right after reading (and the URL filter), before the costlier stages.
"""

from __future__ import annotations

from functools import lru_cache

import pyarrow as pa

from mtnlg_ray.data.columns import with_column

# The model reads the start of a document: enough for a confident guess, and a bounded cost.
SAMPLE_CHARS = 4000


@lru_cache(maxsize=1)
def _identifier():
    from langid.langid import LanguageIdentifier, model

    return LanguageIdentifier.from_modelstring(model, norm_probs=True)


def known_languages() -> set[str]:
    return set(_identifier().nb_classes)


def identify(text: str) -> tuple[str, float]:
    """(ISO 639-1 code, probability) of the most likely language of `text`."""
    language, probability = _identifier().classify(text[:SAMPLE_CHARS])
    return language, float(probability)


def language_batch(batch: pa.Table, keep: list[str] | None, min_confidence: float) -> pa.Table:
    """Add `language`, and `reason` / `detail` for documents not in `keep` or not identified confidently."""
    languages, reasons, details = [], [], []
    wanted = set(keep) if keep is not None else None
    for text in batch.column("text").to_pylist():
        language, probability = identify(text)
        languages.append(language)
        rejected = wanted is not None and (language not in wanted or probability < min_confidence)
        reasons.append("language" if rejected else "")
        details.append(f"{language} ({probability:.2f})" if rejected else "")
    batch = with_column(batch, "language", pa.array(languages, pa.string()))
    batch = with_column(batch, "reason", pa.array(reasons, pa.string()))
    return with_column(batch, "detail", pa.array(details, pa.string()))
