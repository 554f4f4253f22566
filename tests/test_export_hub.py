"""Push to and pull from the Hugging Face Hub through ``huggingface_hub``'s own client, against a local stand-in:
a small Hub server on 127.0.0.1 started inside the test (the few endpoints create_repo, upload_folder and
snapshot_download use). Nothing here reaches the internet."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml
from test_api import TEXT, WORDS, save_ckpt, tiny

import lm
from lm.api import Model
from lm.cli import main
from lm.data.tokenizer import Vocab
from lm.errors import CheckpointError


class FakeHub(BaseHTTPRequestHandler):
    """Repositories in memory: ``repos[repo_id] = {"sha": commit, "files": {path: bytes}}``."""

    repos: dict = {}
    log: list = []

    def log_message(self, *args):  # quiet
        pass

    def _json(self, obj, status=200, headers=None):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_POST(self):
        self.log.append(("POST", self.path))
        body = self._body()
        parts = self.path.split("?")[0].strip("/").split("/")
        if parts[:2] == ["api", "repos"] and parts[2] == "create":
            req = json.loads(body)
            repo = f"{req.get('organization') or 'user'}/{req['name']}" if "/" not in req["name"] else req["name"]
            self.repos.setdefault(repo, {"sha": "0" * 40, "files": {}})
            return self._json({"url": f"http://{self.headers['Host']}/{repo}"})
        if parts == ["api", "validate-yaml"]:  # the client checks a README's metadata before committing it
            content = json.loads(body)["content"]
            meta = yaml.safe_load(content.split("---")[1]) if content.startswith("---") else None
            ok = isinstance(meta, dict) and isinstance(meta.get("license"), str)
            return self._json({"warnings": []} if ok else {"error": "bad metadata"}, 200 if ok else 400)
        if parts[0] == "api" and parts[1] == "models" and parts[4] == "preupload":
            files = json.loads(body)["files"]
            return self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                         for f in files]})
        if parts[0] == "api" and parts[1] == "models" and parts[4] == "commit":
            repo = f"{parts[2]}/{parts[3]}"
            files = dict(self.repos[repo]["files"])
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            sha = hashlib.sha1(json.dumps(sorted((k, v.hex()) for k, v in files.items())).encode()).hexdigest()
            self.repos[repo] = {"sha": sha, "files": files}
            return self._json({"commitUrl": f"http://{self.headers['Host']}/{repo}/commit/{sha}", "commitOid": sha,
                               "pullRequestUrl": None})
        return self._json({"error": f"not in the stand-in: POST {self.path}"}, 404)

    def do_GET(self):
        self.log.append((self.command, self.path))
        parts = self.path.split("?")[0].strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo = self.repos.get(f"{parts[2]}/{parts[3]}")
            if repo is None:
                return self._json({"error": "Repository not found"}, 404, {"X-Error-Code": "RepoNotFound"})
            if len(parts) > 4 and parts[4] == "tree":  # the file list of a revision
                return self._json([{"type": "file", "path": k, "size": len(v), "oid": hashlib.sha1(v).hexdigest()}
                                   for k, v in sorted(repo["files"].items())])
            return self._json({"id": f"{parts[2]}/{parts[3]}", "sha": repo["sha"], "private": False,
                               "siblings": [{"rfilename": k} for k in sorted(repo["files"])]})
        if len(parts) >= 5 and parts[2] == "resolve":
            repo = self.repos.get(f"{parts[0]}/{parts[1]}")
            data = (repo or {"files": {}})["files"].get("/".join(parts[4:]))
            if data is None:
                return self._json({"error": "Entry not found"}, 404, {"X-Error-Code": "EntryNotFound"})
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("X-Repo-Commit", repo["sha"])
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            return
        return self._json({"error": f"not in the stand-in: GET {self.path}"}, 404)

    do_HEAD = do_GET


@pytest.fixture
def hub(monkeypatch, tmp_path):
    FakeHub.repos, FakeHub.log = {}, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    import huggingface_hub.constants as c

    # The client reads these at import; a test elsewhere in the suite may have set the offline flags.
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(c, "ENDPOINT", url)
    monkeypatch.setattr(c, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_the_local_stand_in")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    yield url
    server.shutdown()


def test_push_and_pull_round_trip(hub, tmp_path):
    model = Model(tiny("elliptical", "relative", estimator="causal"), Vocab.from_words(WORDS))
    url = model.push_to_hub("alice/tiny", endpoint=hub)
    files = FakeHub.repos["alice/tiny"]["files"]
    assert sorted(files) == ["README.md", "config.json", "model.safetensors", "tokenizer.json"]
    assert url.startswith(hub)
    again = Model.from_pretrained("alice/tiny", endpoint=hub, cache_dir=str(tmp_path / "cache"))
    assert again.score(TEXT).token_nll == model.score(TEXT).token_nll
    # lm.load("hf://...") goes through the same download (the client's configured endpoint)
    assert lm.load("hf://alice/tiny").score(TEXT).token_nll == model.score(TEXT).token_nll


def test_export_push_to_from_the_cli(hub, tmp_path, capsys):
    ckpt = save_ckpt(tiny("softmax"), tmp_path / "m.ckpt")
    assert main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "e"), "--push_to", "bob/m"]) == 0
    assert "uploaded to bob/m" in capsys.readouterr().out
    uploaded = FakeHub.repos["bob/m"]["files"]
    assert uploaded["model.safetensors"] == (tmp_path / "e" / "model.safetensors").read_bytes()


def test_hub_failures_are_one_paragraph_without_huggingface_cli(hub, tmp_path):
    with pytest.raises(CheckpointError) as e:
        Model.from_pretrained("nobody/missing", endpoint=hub, cache_dir=str(tmp_path / "c"))
    assert "hf download nobody/missing" in str(e.value) and "huggingface-cli" not in str(e.value)
    with pytest.raises(CheckpointError, match="no such checkpoint or folder"):  # a mistyped local path
        Model.from_pretrained(str(tmp_path / "runs" / "last.ckpt"))
    model = Model(tiny("softmax"), Vocab.from_words(WORDS))
    with pytest.raises(CheckpointError) as e:  # a server that is not there
        model.push_to_hub("alice/x", endpoint="http://127.0.0.1:9")
    assert "hf auth login" in str(e.value) and "push_to_hub('alice/x')" in str(e.value)
    assert "huggingface-cli" not in str(e.value)


def test_the_package_root_exposes_the_model_class():
    assert lm.Model is Model and lm.Model.from_pretrained.__func__ is Model.from_pretrained.__func__
