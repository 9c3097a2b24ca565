"""Does averaging the weights of classifiers fine-tuned from one pretrained model (a "soup") beat each?

Reads consolidated classifier checkpoints that share a start (an `examples/sst2/run.sh` seed's
pretrained fine-tune and its self-training students), writes the mean of their weights as one more
consolidated checkpoint, and scores it and each member on a labelled dev file as `mtnlg-ray evaluate
--task classification` does. Prints one JSON object.

    python bench/sst2_soup.py --dev work/sst2-run/dev.tsv --out work/soup-seed0 \
        work/sst2-run/runs/selftrained-seed0/round1/final work/sst2-run/runs/selftrained-seed0/round2/final
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path


def soup(members: list[Path], out: Path) -> Path:
    """The element-wise mean of the members' weights, with the first member's config and tokenizer."""
    from safetensors.torch import load_file, save_file

    states = [load_file(str(m / "model.safetensors")) for m in members]
    keys = set(states[0])
    for member, state in zip(members[1:], states[1:]):
        if set(state) != keys or any(state[k].shape != states[0][k].shape for k in keys):
            raise SystemExit(f"error: {member}: its tensors differ from {members[0]}'s; a soup needs one architecture")
    mean = {k: (sum(s[k].float() for s in states) / len(states)).to(states[0][k].dtype).contiguous() for k in keys}
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(members[0] / name, out / name)
    save_file(mean, str(out / "model.safetensors"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("members", nargs="+", type=Path, help="consolidated classifier checkpoints")
    parser.add_argument("--dev", type=Path, required=True, help="labelled dev file (TSV with label and sentence)")
    parser.add_argument("--out", type=Path, required=True, help="where to write the soup")
    parser.add_argument("--text-field", default="sentence")
    args = parser.parse_args()
    from mtnlg_ray.finetune.evaluate import evaluate_classification

    def accuracy(path: Path) -> float:
        return evaluate_classification(path, args.dev, args.text_field, "label")["accuracy"]

    if len(args.members) < 2:
        sys.exit("error: give two or more checkpoints to average")
    made = soup(args.members, args.out)
    print(json.dumps({"members": {m.name if m.name != "final" else str(m.parent.name): accuracy(m) for m in args.members},
                      "soup": accuracy(made)}))


if __name__ == "__main__":
    main()
