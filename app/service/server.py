"""Running the app under uvicorn with a graceful, exit-0 shutdown on SIGTERM / SIGINT.

On SIGTERM uvicorn stops accepting connections at once, lets in-flight requests finish
(at most `RADAR_SHUTDOWN_TIMEOUT_S`), then runs the lifespan shutdown (batcher, HTTP client).
Afterwards it re-raises the signal to the handler that was installed before it started: with
the default handler that kills the process (exit status -15), so an orchestrator would log a
crash for a clean stop. `run_server` installs its own handler first, so a drained shutdown
exits 0.

Import this module before torch (the CLI does): it sets `OMP_WAIT_POLICY=PASSIVE` unless the
environment says otherwise, which OpenMP reads once, when torch loads. With the default
policy, forwards on the model thread stalled ~1 s each for the first seconds on a busy
2-core host (docs/reliability.md); passive waiting also leaves the cores to the event loop
and image decoding between forwards.
"""

import os
import signal
from types import FrameType

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import uvicorn

from app.service.settings import Settings

STARTUP_FAILURE = 3  # uvicorn's own exit status when the lifespan start-up fails


def run_server(settings: Settings) -> int:
    """Serve until SIGTERM/SIGINT; 0 after a graceful drain (uvicorn exits 3 on a failed start)."""
    from app.service.app import create_app  # imports torch: after the OpenMP setting above

    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s),
    )
    server = uvicorn.Server(config)

    def stop(_signum: int, _frame: FrameType | None) -> None:
        # Before uvicorn takes the signals over: exit right after start-up. After its own
        # graceful shutdown uvicorn calls this again; the server has stopped by then.
        server.should_exit = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if server.started else STARTUP_FAILURE
