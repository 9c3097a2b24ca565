"""The bench scripts time work on a Ray of their own, never on a cluster that happens to run on the machine."""

from __future__ import annotations

import ast
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
# Stages that start or join a Ray (`ensure_ray`) when none is running in the process.
RAY_STAGES = {"pretrain", "prepare_packed", "prepare_dataset", "label_documents", "dedup_documents", "serve.run"}


def calls(tree: ast.AST) -> list[tuple[str, ast.Call]]:
    return [(ast.unparse(node.func), node) for node in ast.walk(tree) if isinstance(node, ast.Call)]


def test_bench_scripts_start_a_local_ray_of_their_own():
    for script in sorted(BENCH.glob("*.py")):
        found = calls(ast.parse(script.read_text(encoding="utf-8")))
        names = {name for name, _ in found}
        # ensure_ray joins RAY_ADDRESS or a `ray start` cluster (and refuses num_cpus then).
        assert "ensure_ray" not in names, f"{script.name}: ensure_ray joins a running cluster"
        for name, call in found:
            if name == "ray.init":
                address = next((k.value for k in call.keywords if k.arg == "address"), None)
                assert isinstance(address, ast.Constant) and address.value == "local", (
                    f"{script.name}:{call.lineno}: ray.init without address='local'")
        if script.name != "common.py" and names & RAY_STAGES:  # common.py: the helpers the scripts call
            assert names & {"start_local_ray", "ray.init"}, (
                f"{script.name} runs {sorted(names & RAY_STAGES)} without starting a Ray of its own")
