"""Running the app under uvicorn with a graceful drain on SIGTERM / SIGINT."""

from __future__ import annotations

import socket
import sys
import threading
import time
from typing import Any

import uvicorn

from microtransformer.serve.state import ServerState

DRAIN_POLL_S = 0.05


class DrainingServer(uvicorn.Server):
    """uvicorn's server whose first SIGTERM/SIGINT drains: the listening socket stays open and
    every new connection is answered (`/health` and the API routes with 503) while the requests
    in flight run to their end; once nothing is in flight and at least `grace` seconds have
    passed since the signal, the socket closes and the process exits 0 (the signal is not
    re-raised). A second signal stops at once."""

    def __init__(self, config: uvicorn.Config, state: ServerState, *,
                 grace: float = 0.0) -> None:
        super().__init__(config)
        self.serve_state = state
        self.grace = grace

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.serve_state.draining:  # second signal: stop now
            self.should_exit = self.force_exit = True
            return
        self.serve_state.draining = True
        grace = f" and {self.grace:g} s (--drain-grace) have passed" if self.grace else ""
        print(f"draining: /health and new requests get 503; stopping once the requests in "
              f"flight are done{grace}", file=sys.stderr, flush=True)
        threading.Thread(target=self._drain, args=(time.monotonic() + self.grace,),
                         name="serve-drain", daemon=True).start()

    def _drain(self, not_before: float) -> None:
        while not self.serve_state.idle or time.monotonic() < not_before:
            time.sleep(DRAIN_POLL_S)
        self.should_exit = True


def serve_until_drained(app: Any, sock: socket.socket, *, drain_grace: float = 0.0) -> None:
    """Serve `app` on the bound socket until a signal has drained it (answering 503 for at
    least `drain_grace` seconds after the signal, and until nothing is in flight)."""
    config = uvicorn.Config(app, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=None)
    DrainingServer(config, app.state.serve, grace=drain_grace).run(sockets=[sock])
