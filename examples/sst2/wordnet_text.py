"""Turn an installed WordNet database into plain-text documents for pretraining (optional general English).

WordNet ships with Debian (`apt-get install wordnet-base` puts it in /usr/share/wordnet); nothing of it is
committed here. Each synset becomes one document in SST-2's own spelling (lower case, punctuation set apart
by spaces), its words first and then its gloss and usage examples:

    awful , dire , dreadful , terrible : causing fear or dread or terror ; the awful war ; an awful risk

so a language model pretrained on it sees a rare word beside its synonyms and a definition in common words.
Labels of any kind are not read: WordNet has none for sentiment.

    python examples/sst2/wordnet_text.py --wordnet /usr/share/wordnet --out work/wordnet.jsonl
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

PARTS = {"adj": "adjectives", "adv": "adverbs", "verb": "verbs", "noun": "nouns"}
_MARKER = re.compile(r"\([a-z]+\)$")  # adjective position markers: dread(a), alive(p), galore(ip)
_PUNCT = re.compile(r"([.,;:!?()\"])")


def sst_spelling(text: str) -> str:
    """`text` lower-cased with punctuation split off and apostrophe endings apart, as SST-2 writes."""
    text = text.lower().replace("`", "'").replace("''", '"')
    text = _PUNCT.sub(r" \1 ", text)
    text = re.sub(r"(\w)('s|'re|'ve|'ll|'d|n't)\b", r"\1 \2", text)
    return " ".join(text.replace('"', " ").split())


def synset_text(line: str) -> str | None:
    """One synset line of a WordNet data.POS file as a document, or None for the licence header."""
    if line.startswith(" ") or "|" not in line:
        return None
    fields, gloss = line.split("|", 1)
    parts = fields.split()
    count = int(parts[3], 16)
    words = []
    for word in parts[4 : 4 + 2 * count : 2]:
        word = _MARKER.sub("", word).replace("_", " ")
        if word.lower() not in (w.lower() for w in words):
            words.append(word)
    return f"{sst_spelling(' , '.join(words))} : {sst_spelling(gloss)}"


def fail(message: str) -> None:
    """Bad input: one line on stderr, exit code 2."""
    print(message, file=sys.stderr)
    raise SystemExit(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wordnet", type=Path, default=Path("/usr/share/wordnet"),
                        help="folder holding WordNet's data.adj, data.adv, data.verb and data.noun")
    parser.add_argument("--out", type=Path, required=True, help="JSONL to write, one {\"text\": ...} per synset")
    parser.add_argument("--parts", default="adj,adv,verb",
                        help=f"comma-separated parts of speech out of {', '.join(PARTS)} (default: adj,adv,verb)")
    args = parser.parse_args()

    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        fail(f"--parts: expected some of {', '.join(PARTS)}, got {', '.join(unknown)}")
    missing = [str(args.wordnet / f"data.{p}") for p in parts if not (args.wordnet / f"data.{p}").is_file()]
    if missing:
        fail(f"{missing[0]}: not found; install WordNet (Debian: apt-get install wordnet-base) "
             "or point --wordnet at its dict folder")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    n_docs = n_words = 0
    with args.out.open("w", encoding="utf-8") as out:
        for part in parts:
            with (args.wordnet / f"data.{part}").open(encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    text = synset_text(line)
                    if text:
                        out.write(json.dumps({"text": text}) + "\n")
                        n_docs += 1
                        n_words += len(text.split())
    print(f"{args.out}: {n_docs} synsets ({', '.join(PARTS[p] for p in parts)}), {n_words} words")


if __name__ == "__main__":
    main()
