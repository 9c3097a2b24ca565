"""Ray Job entrypoint for self-training: `mtnlg-ray self-train` under plain Ray tooling.

    ray job submit --working-dir . -- python jobs/self_train.py --config F [--set k=v]...

Paths are taken as they are on the cluster (give absolute ones); `mtnlg-ray submit self-train` makes them so.
"""

import sys

from mtnlg_ray.cli import app

if __name__ == "__main__":
    app(["self-train", *sys.argv[1:]], prog_name="jobs/self_train.py")
