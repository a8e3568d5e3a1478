"""Prefect's temporary server, started before `ms2rgb run` imports the pipeline instead of after.

With no PREFECT_API_URL, Prefect's client starts a temporary server (a uvicorn subprocess) the first
time a flow calls the API: only after `ms2rgb run` has imported torch, open_clip, MLflow and the
stages (about 8 s on 2 cores), and its own start (imports, a fresh SQLite database) took another
14 s in `make run`, one after the other on one core. Started here first, from a thread, the same
server (Prefect's SubprocessASGIServer, which the client then finds running) comes up on the
other core while the pipeline imports.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


def start_early() -> Callable[[], None]:
    """Start Prefect's temporary server in the background when a flow will need one; returns a
    function that waits until it answers (raising what its start raised). Until then nothing may
    call the API: the client would take the half-started server as running."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ALLOW_EPHEMERAL_MODE

    if PREFECT_API_URL.value() or not PREFECT_SERVER_ALLOW_EPHEMERAL_MODE.value():
        return lambda: None
    from prefect.server.api.server import SubprocessASGIServer

    server, failures = SubprocessASGIServer(), []  # the instance the client's get_client() uses

    def start() -> None:
        try:
            server.start()
        except Exception as exc:  # handed to the waiting caller, whose traceback the user sees
            failures.append(exc)

    # A daemon thread: a run that stops early (bad params) does not wait for it. start() spawns the
    # server and registers its atexit stop within microseconds, long before such a stop can come
    # (loading the params alone imports torch), so the server never outlives the command.
    thread = threading.Thread(target=start, name="prefect-temporary-server", daemon=True)
    thread.start()

    def wait() -> None:
        thread.join()
        if failures:
            raise failures[0]

    return wait
