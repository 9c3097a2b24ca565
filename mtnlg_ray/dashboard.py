"""Reaching a Ray cluster's job server: a `JobSubmissionClient` for an address, sending this machine's
Ray token when the cluster asks for one. A leaf: the Jobs client and the local-cluster helpers use it.
"""

from __future__ import annotations

import logging
import os

from mtnlg_ray.errors import MtnlgError, first_line


def connect(address: str):
    """A JobSubmissionClient for the cluster whose dashboard (or GCS) is at `address`."""
    from ray.exceptions import AuthenticationError, RpcError
    from ray.job_submission import JobSubmissionClient

    # Ray's client logs each package upload and socket close at INFO; what matters is printed by us.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("ray.dashboard", "ray._private.runtime_env")):
            logging.getLogger(name).setLevel(logging.WARNING)
    if _is_dashboard_without_scheme(address):
        # Ray reads HOST:PORT as a GCS address: it waited 40 s, printed its own C++ log lines and then
        # said GCS timed out, about the dashboard's port.
        raise MtnlgError(f"{address} answers as a Ray dashboard, but HOST:PORT is read as a GCS address; "
                         f"give the dashboard as http://{address}")
    # Ray lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS win over the address it is given; ours must win.
    saved = {key: os.environ.pop(key) for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if key in os.environ}
    try:
        try:
            return JobSubmissionClient(address)
        except AuthenticationError:
            if not _send_local_token():
                raise
            return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError, AuthenticationError, RpcError) as exc:  # RpcError: a GCS
        # address ("HOST:6379") where nothing answers; Ray gives up after its own timeout
        raise MtnlgError(f"cannot reach a Ray cluster's job server at {address} ({first_line(exc)})") from None
    finally:
        os.environ.update(saved)


def _is_dashboard_without_scheme(address: str) -> bool:
    """Whether `address`, given as HOST:PORT, is a dashboard's: its job API answers HTTP there."""
    import http.client
    import urllib.error
    import urllib.request

    if "://" in address or ":" not in address:
        return False
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # an http_proxy's 403 is no dashboard
    try:
        with opener.open(f"http://{address}/api/version", timeout=3) as reply:
            return reply.status == 200 and b"ray_version" in reply.read(4096)
    except urllib.error.HTTPError as err:  # a dashboard that wants a token still answers
        return err.code in (401, 403)
    except (OSError, ValueError, http.client.HTTPException):  # nothing there, or a GCS: its gRPC is no HTTP/1
        return False


def _send_local_token() -> bool:
    """Send this machine's Ray token (~/.ray/auth_token) to a cluster that asked for one.

    `ray start` turns token authentication on by itself when a token exists, but Ray's clients only
    send it under RAY_AUTH_MODE=token; an explicit RAY_AUTH_MODE is left as the user set it.
    """
    from ray._private.authentication import authentication_token_setup as token_setup

    if os.environ.get(token_setup.AUTH_MODE_ENV_VAR):
        return False
    quiet = logging.getLogger(token_setup.__name__)
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # it warns that token auth is on, which is why we are here
    try:
        return token_setup.maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    finally:
        quiet.setLevel(level)
