"""An elastic pretraining run that loses a node: run by tests/test_train.py in its own process.

Starts a real two-node Ray cluster on this machine (one CPU each, `ray.cluster_utils.Cluster`), runs
`pretrain` with `parallel.workers=[1, 2]`, and once a checkpoint is written and training has gone a
few steps further, removes the second node: its raylet and the training worker on it are killed
(SIGKILL), and the cluster has room for one worker only. Ray Train must restart the run on the
remaining worker from the checkpoint written at two. Prints the pretrain result as JSON.

    python tests/elastic_run.py DATASET RUNS_DIR
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from mtnlg_ray.config import load_config
from mtnlg_ray.train.trainer import pretrain


def remove_node_after_checkpoint(cluster: Cluster, node, metrics: Path, done: dict) -> None:
    deadline = time.time() + 400
    while time.time() < deadline:
        if metrics.is_file():
            records = [json.loads(line) for line in metrics.read_text().splitlines() if line.endswith("}")]
            saved = [r["step"] for r in records if r.get("event") == "checkpoint"]
            latest = max((r["step"] for r in records if "loss" in r), default=0)
            if saved and latest >= saved[0] + 3:
                done["after_step"] = latest
                cluster.remove_node(node, allow_graceful=False)
                return
        time.sleep(0.05)


def main() -> None:
    dataset, runs = Path(sys.argv[1]), Path(sys.argv[2])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    second = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    config = load_config(
        overrides=[
            f"data.path={dataset}", f"run.storage_path={runs}", "run.name=elastic", "model.preset=tiny",
            "model.seq_len=64", "parallel.workers=[1, 2]", "train.max_steps=30", "train.global_batch_size=8",
            "train.micro_batch_size=2", "train.lr=3e-3", "train.warmup_tokens=2048", "train.decay_tokens=20000",
            "train.eval_every=20", "train.eval_batches=2", "checkpoint.every_steps=10", "train.peak_tflops=1.0",
            "run.max_failures=3",
        ],
        stage="pretrain",
    )
    removed: dict = {}
    watcher = threading.Thread(
        target=remove_node_after_checkpoint, args=(cluster, second, runs / "elastic" / "metrics.jsonl", removed)
    )
    watcher.start()
    try:
        result = pretrain(config)
        watcher.join()
        print(json.dumps({**result, "node_removed_after_step": removed.get("after_step")}))
    finally:
        # Also removes the cluster's address file, which a later plain ray.init() would join.
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
