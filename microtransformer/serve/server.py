"""Running the app under uvicorn with a graceful drain on SIGTERM / SIGINT."""

from __future__ import annotations

import socket
import sys
import threading
import time
from typing import Any

import uvicorn

from microtransformer.serve.app import ServerState

DRAIN_POLL_S = 0.05


class DrainingServer(uvicorn.Server):
    """uvicorn's server whose first SIGTERM/SIGINT drains: the app answers 503 to new requests,
    and the server stops once nothing is in flight, so the process exits 0 (the signal is not
    re-raised). A second signal stops at once."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.serve_state = state

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.serve_state.draining:  # second signal: stop now
            self.should_exit = self.force_exit = True
            return
        self.serve_state.draining = True
        print("draining: new requests get 503; stopping once the requests in flight are done",
              file=sys.stderr, flush=True)
        threading.Thread(target=self._drain, name="serve-drain", daemon=True).start()

    def _drain(self) -> None:
        while not self.serve_state.idle:
            time.sleep(DRAIN_POLL_S)
        self.should_exit = True


def serve_until_drained(app: Any, sock: socket.socket) -> None:
    """Serve `app` on the bound socket until a signal has drained it."""
    config = uvicorn.Config(app, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=None)
    DrainingServer(config, app.state.serve).run(sockets=[sock])
