"""Ray Job entrypoint for pseudo-labelling alone: `mtnlg-ray data label` under plain Ray tooling.

    ray job submit --working-dir . -- python jobs/label.py INPUT... --output DIR --labeler L --model PATH

Paths are taken as they are on the cluster (give absolute ones); `mtnlg-ray submit label` makes them so.
"""

import sys

from mtnlg_ray.cli import app

if __name__ == "__main__":
    app(["data", "label", *sys.argv[1:]], prog_name="jobs/label.py")
