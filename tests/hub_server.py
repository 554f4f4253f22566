"""Local HTTP servers on 127.0.0.1 for the download tests (no test touches the internet).

``serve_dir(folder)``: a plain static file server (EnWik8's zip, a checkpoint URL), with its GET log.

``HubServer``: a stand-in for the Hugging Face hub, for the dataset downloads: the two endpoints that
``lm.data.download.hub_split`` uses through huggingface_hub (``HfApi.list_repo_tree`` and ``hf_hub_download``),
serving parquet files written by the test. Point ``HF_ENDPOINT`` at ``url``.

    with HubServer() as hub:
        hub.add("nyu-mll/glue", "sst2/train-00000-of-00001.parquet", parquet_bytes({...}))
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import io
import json
import threading
import urllib.parse

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # any 40-hex revision


def parquet_bytes(columns: dict) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf)
    return buf.getvalue()


class _QuietFiles(http.server.SimpleHTTPRequestHandler):
    gets: list[str]

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.gets.append(self.path)
        super().do_GET()

    def log_message(self, *args):  # keep pytest output clean
        pass


@contextlib.contextmanager
def serve_dir(folder):
    """Serve ``folder`` on 127.0.0.1; yields (base URL ending in ``/``, the list of GET paths, growing)."""
    gets: list[str] = []
    handler = functools.partial(type("Files", (_QuietFiles,), {"gets": gets}), directory=str(folder))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/", gets
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


class HubServer:
    def __init__(self):
        self.files: dict[tuple[str, str], bytes] = {}  # (repo, path) -> bytes
        self.gets: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_HEAD(self):  # noqa: N802 (http.server's name)
                self._answer(body=False)

            def do_GET(self):  # noqa: N802
                server.gets.append(self.path)
                self._answer(body=True)

            def _answer(self, body: bool):
                path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
                data, ctype, extra = server.route(path)
                if data is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                for k, v in extra.items():
                    self.send_header(k, v)
                self.end_headers()
                if body:
                    self.wfile.write(data)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def add(self, repo: str, path: str, data: bytes) -> None:
        self.files[(repo, path)] = data

    def route(self, path: str):
        """(body, content type, headers) for a hub URL path, or (None, ...) for a 404."""
        if path.startswith("/api/datasets/"):  # /api/datasets/<org>/<name>/tree/<rev>/<folder>
            parts = path[len("/api/datasets/"):].split("/")
            repo, folder = "/".join(parts[:2]), "/".join(parts[4:])
            entries = [{"type": "file", "path": p, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                       for (r, p), d in sorted(self.files.items())
                       if r == repo and p.rpartition("/")[0] == folder]
            return json.dumps(entries).encode(), "application/json", {}
        if path.startswith("/datasets/"):  # /datasets/<org>/<name>/resolve/<rev>/<file>
            parts = path[len("/datasets/"):].split("/")
            key = ("/".join(parts[:2]), "/".join(parts[4:]))
            if key in self.files:
                data = self.files[key]
                return data, "application/octet-stream", {"X-Repo-Commit": COMMIT,
                                                          "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
        return None, "", {}

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)
