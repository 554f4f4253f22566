"""Local HTTP servers on 127.0.0.1 for the download tests (no test touches the internet).

``serve_dir(folder)``: a plain static file server (EnWik8's zip, a checkpoint URL), with its GET log.

``HubServer``: a stand-in for the Hugging Face hub speaking the endpoints huggingface_hub's own client uses:

- dataset repos, for ``lm.data.download.hub_split`` (``HfApi.list_repo_tree``, ``hf_hub_download``): parquet
  files written by the test with ``add``;
- model repos, for ``Model.push_to_hub``/``from_pretrained`` and ``lm export --push_to`` (``create_repo``,
  ``upload_folder``: preupload + commit, ``snapshot_download``): ``repos[repo_id] = {"sha", "files"}``, filled
  by uploads or by the test.

Point ``HF_ENDPOINT`` (or huggingface_hub's constants, which it reads at import) at ``url``.

    with HubServer() as hub:
        hub.add("nyu-mll/glue", "sst2/train-00000-of-00001.parquet", parquet_bytes({...}))
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import http.server
import io
import json
import threading
import urllib.parse

import yaml

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


def _commit_sha(files: dict[str, bytes]) -> str:
    return hashlib.sha1(json.dumps(sorted((k, v.hex()) for k, v in files.items())).encode()).hexdigest()


def _tree(files: dict[str, bytes]) -> list[dict]:
    return [{"type": "file", "path": p, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
            for p, d in sorted(files.items())]


class HubServer:
    """Dataset files (``files``, via ``add``) and model repositories (``repos``) in memory; ``gets`` logs the
    GET paths, ``log`` every (method, path)."""

    def __init__(self):
        self.files: dict[tuple[str, str], bytes] = {}  # dataset (repo, path) -> bytes
        self.repos: dict[str, dict] = {}  # model repo id -> {"sha": commit, "files": {path: bytes}}
        self.gets: list[str] = []
        self.log: list[tuple[str, str]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_HEAD(self):  # noqa: N802 (http.server's name)
                self._answer()

            def do_GET(self):  # noqa: N802
                server.gets.append(self.path)
                self._answer()

            def do_POST(self):  # noqa: N802
                self._answer(self.rfile.read(int(self.headers.get("Content-Length") or 0)))

            def _answer(self, body: bytes = b""):
                server.log.append((self.command, self.path))
                path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
                host = f"http://{self.headers['Host']}"
                if self.command == "POST":
                    status, data, ctype, extra = server.post(path, body, host)
                else:
                    status, data, ctype, extra = server.route(path)
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                for k, v in extra.items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def add(self, repo: str, path: str, data: bytes) -> None:
        """A file of the DATASET repo ``repo``."""
        self.files[(repo, path)] = data

    # ----- answers: (status, body, content type, extra headers) ------------------------------------------------
    @staticmethod
    def _json(obj, status: int = 200, headers: dict | None = None):
        return status, json.dumps(obj).encode(), "application/json", headers or {}

    @staticmethod
    def _file(data: bytes, sha: str):
        return 200, data, "application/octet-stream", {"X-Repo-Commit": sha,
                                                       "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}

    def _missing(self, what: str):
        return self._json({"error": f"Entry not found: {what}"}, 404, {"X-Error-Code": "EntryNotFound"})

    def route(self, path: str):
        """A GET or HEAD of a hub URL path."""
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "datasets"]:  # /api/datasets/<org>/<name>/tree/<rev>/<folder>
            repo, folder = "/".join(parts[2:4]), "/".join(parts[6:])
            return self._json(_tree({p: d for (r, p), d in self.files.items()
                                     if r == repo and p.rpartition("/")[0] == folder}))
        if parts[0] == "datasets":  # /datasets/<org>/<name>/resolve/<rev>/<file>
            key = ("/".join(parts[1:3]), "/".join(parts[5:]))
            return self._file(self.files[key], COMMIT) if key in self.files else self._missing(path)
        if parts[:2] == ["api", "models"] and len(parts) >= 4:  # /api/models/<org>/<name>[/tree|revision/...]
            repo = self.repos.get("/".join(parts[2:4]))
            if repo is None:
                return self._json({"error": "Repository not found"}, 404, {"X-Error-Code": "RepoNotFound"})
            if len(parts) > 4 and parts[4] == "tree":  # the file list of a revision
                return self._json(_tree(repo["files"]))
            return self._json({"id": "/".join(parts[2:4]), "sha": repo["sha"], "private": False,
                               "siblings": [{"rfilename": k} for k in sorted(repo["files"])]})
        if len(parts) >= 5 and parts[2] == "resolve":  # /<org>/<name>/resolve/<rev>/<file>
            repo = self.repos.get("/".join(parts[:2]))
            data = (repo or {"files": {}})["files"].get("/".join(parts[4:]))
            return self._missing(path) if data is None else self._file(data, repo["sha"])
        return self._json({"error": f"not in the stand-in: GET {path}"}, 404)

    def post(self, path: str, body: bytes, host: str):
        """The uploads: create a model repo, check a model card, preupload, commit."""
        parts = path.strip("/").split("/")
        if parts[:3] == ["api", "repos", "create"]:
            req = json.loads(body)
            repo = req["name"] if "/" in req["name"] else f"{req.get('organization') or 'user'}/{req['name']}"
            self.repos.setdefault(repo, {"sha": "0" * 40, "files": {}})
            return self._json({"url": f"{host}/{repo}"})
        if parts == ["api", "validate-yaml"]:  # the client checks a README's metadata before committing it
            content = json.loads(body)["content"]
            meta = yaml.safe_load(content.split("---")[1]) if content.startswith("---") else None
            ok = isinstance(meta, dict) and isinstance(meta.get("license"), str)
            return self._json({"warnings": []} if ok else {"error": "bad metadata"}, 200 if ok else 400)
        if parts[:2] == ["api", "models"] and len(parts) >= 5 and parts[4] == "preupload":
            return self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                         for f in json.loads(body)["files"]]})
        if parts[:2] == ["api", "models"] and len(parts) >= 5 and parts[4] == "commit":
            repo = "/".join(parts[2:4])
            files = dict(self.repos[repo]["files"])
            for line in body.decode().splitlines():  # ndjson: a header, then one item per file
                item = json.loads(line)
                if item["key"] == "file":
                    files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            sha = _commit_sha(files)
            self.repos[repo] = {"sha": sha, "files": files}
            return self._json({"commitUrl": f"{host}/{repo}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None})
        return self._json({"error": f"not in the stand-in: POST {path}"}, 404)

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)
