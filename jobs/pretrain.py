"""Ray Job entrypoint for pretraining: `mtnlg-ray pretrain` under plain Ray tooling.

    ray job submit --working-dir . -- python jobs/pretrain.py --config F [--set k=v]...

Paths are taken as they are on the cluster (give absolute ones); `mtnlg-ray submit pretrain` makes them so.
"""

import sys

from mtnlg_ray.cli import app

if __name__ == "__main__":
    app(["pretrain", *sys.argv[1:]], prog_name="jobs/pretrain.py")
