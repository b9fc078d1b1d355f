"""A dishonest worker with a real key, for the pool's tests: it lets a real worker run each
job, then claims the result as its own with a different stdout hash, correctly signed.

It passes every health challenge (it signs the nonce with its own key, with the real
worker's load) and its every result verifies under its key: only comparing it with
other replicas of the same job can catch it.  A thread in the test process; stdlib only.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from sandrun.identity import WorkerIdentity, health_response, sign_result

FORGED_STDOUT_SHA256 = "0" * 64
_PASSED = ("Content-Type", "X-Forwarded-For", "Accept")


class ForgingWorker:
    def __init__(self, identity: WorkerIdentity, backend: str) -> None:
        self.identity, self.backend = identity, backend.rstrip("/")
        self.forged = 0  # results it has claimed with a forged stdout hash
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def relay(self, method: str, path: str, headers: dict[str, str],
              body: bytes | None) -> tuple[int, dict[str, str], bytes]:
        request = urllib.request.Request(self.backend + path, data=body, method=method,
                                         headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def health(self, nonce: str) -> dict[str, Any]:
        _, _, body = self.relay("GET", "/health", {}, None)
        load = json.loads(body)["load"]
        return {"status": "healthy", "worker_id": self.identity.worker_id, "load": load,
                **health_response(self.identity, nonce, load, time.time())}

    def forge(self, status: dict[str, Any]) -> dict[str, Any]:
        metadata = status.get("worker_metadata") or {}
        if not metadata.get("signed"):
            metadata["worker_id"] = self.identity.worker_id
            return status
        result = json.loads(metadata["signed"])
        result["worker_id"] = self.identity.worker_id
        result["stdout_sha256"] = FORGED_STDOUT_SHA256
        signed, signature = sign_result(self.identity, result)
        status["execution_metadata"]["stdout_sha256"] = FORGED_STDOUT_SHA256
        status["worker_metadata"] = {"worker_id": self.identity.worker_id, "signed": signed,
                                     "signature": signature}
        self.forged += 1
        return status

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        worker = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def answer(self, code: int, headers: dict[str, str], body: bytes) -> None:
                self.send_response(code)
                for name, value in headers.items():
                    if name.lower() in ("content-type", "retry-after"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def handle_any(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                url = urlsplit(self.path)
                if url.path == "/health":
                    nonce = parse_qs(url.query).get("nonce", [""])[0]
                    doc = worker.health(nonce)
                    self.answer(200, {"Content-Type": "application/json"},
                                json.dumps(doc).encode())
                    return
                headers = {k: v for k, v in self.headers.items() if k in _PASSED}
                code, reply_headers, reply = worker.relay(method, self.path, headers, body)
                if method == "GET" and url.path.startswith("/status/") and code == 200:
                    reply = json.dumps(worker.forge(json.loads(reply))).encode()
                self.answer(code, reply_headers, reply)

            def do_GET(self) -> None:
                self.handle_any("GET")

            def do_POST(self) -> None:
                self.handle_any("POST")

            def do_DELETE(self) -> None:
                self.handle_any("DELETE")

        return Handler
