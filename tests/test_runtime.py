"""The Ray mtnlg-ray starts for a command: workers at the driver's priority unless the user says otherwise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from mtnlg_ray.runtime import NICENESS_VARIABLE, worker_niceness_default

START_AND_ASK = """
import json, os, ray
from mtnlg_ray.runtime import ensure_ray
ensure_ray(num_cpus=1)
nice = ray.get(ray.remote(lambda: os.nice(0)).options(num_cpus=0).remote())
print(json.dumps({"worker": nice, "driver": os.nice(0), "left_set": "RAY_worker_niceness" in os.environ}))
ray.shutdown()
"""


def test_ensure_ray_starts_workers_at_the_drivers_priority():
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", NICENESS_VARIABLE)}
    # A temp dir of its own (short: Ray's socket paths must stay under 108 characters), so no
    # running cluster's address file is found and joined: this starts a fresh local Ray.
    with tempfile.TemporaryDirectory(prefix="mtr", dir="/tmp") as temp:
        env["RAY_TMPDIR"] = temp
        out = subprocess.run([sys.executable, "-c", START_AND_ASK], capture_output=True, text=True, env=env,
                             timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # Ray's own default is 15 (the test would see that with the setting gone).
    assert result == {"worker": result["driver"], "driver": result["driver"], "left_set": False}


def test_a_niceness_the_user_set_is_kept(monkeypatch):
    monkeypatch.setenv(NICENESS_VARIABLE, "7")
    with worker_niceness_default():
        assert os.environ[NICENESS_VARIABLE] == "7"
    assert os.environ[NICENESS_VARIABLE] == "7"
    monkeypatch.delenv(NICENESS_VARIABLE)
    with worker_niceness_default():
        assert os.environ[NICENESS_VARIABLE] == "0"
    assert NICENESS_VARIABLE not in os.environ


def test_ray_datas_console_shows_warnings_but_not_its_name_truncation_notice():
    """Every `data prepare` printed Ray Data's "Truncating long operator name ... set DataContext..."
    warning; its other warnings and errors still reach the console, and the log file keeps them all."""
    import logging

    from mtnlg_ray.runtime import quiet_ray_data_console

    quiet_ray_data_console()
    [console] = [h for h in logging.getLogger("ray.data").handlers if h.get_name() == "console"]
    filters = len(console.filters)
    quiet_ray_data_console()  # a second stage in the same process adds no second filter

    def record(level, message):
        return logging.LogRecord("ray.data._internal.progress.utils", level, __file__, 1, message, None, None)

    assert not console.filter(record(logging.WARNING, "Truncating long operator name to 100 characters. To ..."))
    assert console.filter(record(logging.WARNING, "Operator MapBatches is backpressured"))
    assert console.level == logging.WARNING and len(console.filters) == filters


def test_rays_token_auth_enabled_notice_is_dropped_but_its_auth_disabled_warning_is_not():
    """Every command that started a Ray printed Ray's "Token authentication is enabled for this Ray
    cluster" on stderr, so a refusal after ray.init was two lines, not one."""
    import logging

    from ray._private.authentication import authentication_token_setup as setup

    from mtnlg_ray.runtime import quiet_token_auth_notice

    quiet_token_auth_notice()
    quiet_token_auth_notice()
    assert len(logging.getLogger(setup.__name__).filters) == 1
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # Ray's loggers do not propagate to root
    logger = logging.getLogger(setup.__name__)
    logger.addHandler(handler)
    try:
        setup._warn_token_auth_enabled()  # Ray's own calls, as ray.init makes them
        setup._warn_token_auth_disabled()
    finally:
        logger.removeHandler(handler)
    assert [m.split(".")[0] for m in seen] == ["Token authentication is disabled for this Ray cluster"]
