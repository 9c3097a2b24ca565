"""Ray Job entrypoint for the OpenAI-compatible server (runs until the job is stopped): `mtnlg-ray serve` under plain Ray tooling.

    ray job submit --working-dir . -- python jobs/serve.py --checkpoint CKPT [--host 0.0.0.0]

Paths are taken as they are on the cluster (give absolute ones); `mtnlg-ray submit serve` makes them so.
"""

import sys

from mtnlg_ray.cli import app

if __name__ == "__main__":
    app(["serve", *sys.argv[1:]], prog_name="jobs/serve.py")
