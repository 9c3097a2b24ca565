"""`python -m mtnlg_ray ...` is `mtnlg-ray ...`: what the Ray Jobs that `mtnlg-ray submit` sends run."""

from mtnlg_ray.cli import app

if __name__ == "__main__":
    app(prog_name="mtnlg-ray")
