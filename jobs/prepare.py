"""Ray Job entrypoint for the corpus pipeline: `mtnlg-ray data prepare` under plain Ray tooling.

    ray job submit --working-dir . -- python jobs/prepare.py INPUT... --output DIR [--config F] [--set k=v]...

Paths are taken as they are on the cluster (give absolute ones); `mtnlg-ray submit prepare` makes them so.
"""

import sys

from mtnlg_ray.cli import app

if __name__ == "__main__":
    app(["data", "prepare", *sys.argv[1:]], prog_name="jobs/prepare.py")
