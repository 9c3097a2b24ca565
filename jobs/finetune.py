"""Ray Job entrypoint for fine-tuning: `mtnlg-ray finetune` under plain Ray tooling.

    ray job submit --working-dir . -- python jobs/finetune.py --config F [--set k=v]...

Paths are taken as they are on the cluster (give absolute ones); `mtnlg-ray submit finetune` makes them so.
"""

import sys

from mtnlg_ray.cli import app

if __name__ == "__main__":
    app(["finetune", *sys.argv[1:]], prog_name="jobs/finetune.py")
