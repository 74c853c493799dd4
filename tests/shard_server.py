"""A localhost HTTP server for the remote-shard tests: serves a directory from a thread, with faults by path prefix.

    /NAME        the file (404 if there is none)
    /dead/NAME   503 on every request
    /cut/NAME    the headers of the whole file, half of its bytes, then the connection is dropped (every request)
    /flaky/NAME  cut like /cut on the first request of NAME, whole afterwards

`requests` counts the requests per path, so a test can tell a retried shard from one given up at once.
"""

from __future__ import annotations

import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

FAULTS = ("dead", "cut", "flaky")


class ShardServer:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.requests: Counter = Counter()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                path = self.path.split("?", 1)[0].lstrip("/")
                server.requests[path] = server.requests[path] + 1
                fault, _, rest = path.partition("/")
                if fault not in FAULTS:
                    fault, rest = "", path
                file = server.root / rest
                if fault == "dead":
                    self.send_error(503, "unavailable")
                    return
                if not file.is_file():
                    self.send_error(404, "no such shard")
                    return
                data = file.read_bytes()
                cut = fault == "cut" or (fault == "flaky" and server.requests[path] == 1)
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2] if cut else data)
                self.wfile.flush()
                self.close_connection = True

            def log_message(self, *args):  # quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "ShardServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
