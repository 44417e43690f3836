"""A backend for the real-node scenario: answers every request with what it received, as JSON.

Runs in the nhigate image (stdlib only). Binds BIND_ADDRESS:PORT (default 0.0.0.0:8080); a
hostNetwork copy binds the node's own address so nothing listens on other interfaces.
"""

import json
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        payload = json.dumps(
            {
                "method": self.command,
                "path": self.path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "body": body.decode("utf-8", "replace"),
                "pod": os.environ.get("POD_NAME", ""),
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _answer  # noqa: N815 (http.server names)

    def log_message(self, format: str, *args: object) -> None:
        pass


if __name__ == "__main__":
    address = (os.environ.get("BIND_ADDRESS", "0.0.0.0"), int(os.environ.get("PORT", "8080")))
    ThreadingHTTPServer(address, Echo).serve_forever()
