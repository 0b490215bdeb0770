"""`GET /progress`: the trainer's live progress as JSON, for the operator to poll."""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from finetune_trainer.progress import PROGRESS_PATH
from finetune_trainer.tracker import ProgressTracker

log = logging.getLogger(__name__)


def _handler(tracker: ProgressTracker) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] == PROGRESS_PATH:
                body, status = tracker.snapshot().to_json().encode(), 200
            elif self.path == "/healthz":
                body, status = b"ok", 200
            else:
                body, status = b'{"error": "not found"}', 404
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            log.debug("progress server: " + format, *args)

    return Handler


class ProgressServer:
    """Serves the tracker's progress on a background thread until `close()`."""

    def __init__(self, tracker: ProgressTracker, port: int, host: str = "0.0.0.0") -> None:
        self._server = ThreadingHTTPServer((host, port), _handler(tracker))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="progress-server", daemon=True
        )

    @property
    def port(self) -> int:
        """The bound port (useful when started on port 0)."""
        return int(self._server.server_address[1])

    def start(self) -> ProgressServer:
        """Start serving in the background."""
        self._thread.start()
        log.info("progress served on :%d%s", self.port, PROGRESS_PATH)
        return self

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
