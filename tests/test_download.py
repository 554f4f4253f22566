"""Data on a fresh machine: downloads for real over HTTP from servers on 127.0.0.1 (generated zip and
parquet files); the Hugging Face hub is a stand-in (tests/hub_server.py) that huggingface_hub talks to through
$HF_ENDPOINT."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import lm.data.corpora as corpora
import lm.data.download as download
from lm.data.datamodule import LMDataModule
from lm.data.sst2 import find_sst2, read_tsv
from lm.errors import DataError

from hub_server import HubServer, parquet_bytes, serve_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving ``tmp_path/www``; yields (base URL, served dir, GET log)."""
    www = tmp_path / "www"
    www.mkdir()
    with serve_dir(www) as (url, gets):
        yield url, www, gets


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """A machine without any data root: cwd without ./data, no $LM_DATA_DIR, no ../shared/data."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("LM_DATA_DIR", raising=False)
    monkeypatch.delenv("LM_DATA_BASE_URL", raising=False)
    monkeypatch.setattr(corpora, "repo_root", lambda: tmp_path / "clone")
    return tmp_path


@pytest.fixture
def hub(monkeypatch):
    """A Hugging Face hub stand-in on 127.0.0.1, with $HF_ENDPOINT pointing at it."""
    with HubServer() as h:
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        yield h


def hub_parquet(hub, repo: str, config: str, split: str, columns: dict) -> None:
    hub.add(repo, f"{config}/{split}-00000-of-00001.parquet", parquet_bytes(columns))


def enwik8_bytes(n=4000) -> bytes:
    words = ["<page>", "<title>", "Zürich", "naïve", "&amp;", "日本", "</text>", "\n"]
    out = bytearray()
    i = 0
    while len(out) < n:
        out += (words[(i * 7 + i // 3) % len(words)] + " ").encode("utf-8")
        i += 1
    return bytes(out[:n])


def test_enwik8_downloaded_once_checksummed_and_read(server, fresh, monkeypatch):
    url, www, gets = server
    raw = enwik8_bytes()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("enwik8", raw)
    (www / "enwik8.zip").write_bytes(buf.getvalue())
    monkeypatch.setattr(download, "ENWIK8_ZIP_SHA256", hashlib.sha256(buf.getvalue()).hexdigest())
    root = fresh / "data"
    dm = LMDataModule(corpus="enwik8", root=str(root), base_url=url, cache_dir=str(fresh / "cache"))
    # The standard split, as percent of the file: valid is bytes [90%, 95%).
    assert bytes(dm.tokens("valid").tolist()) == raw[len(raw) * 90 // 100: len(raw) * 95 // 100]
    assert (root / "enwik8" / "enwik8.zip").read_bytes() == buf.getvalue()
    assert sorted(p.name for p in (root / "enwik8").iterdir()) == ["enwik8.zip"]  # no temporary left
    assert gets == ["/enwik8.zip"]
    # A second run (new process, same machine) reads the local copy: no request.
    dm2 = LMDataModule(corpus="enwik8", root=str(root), base_url=url, cache_dir=str(fresh / "cache2"))
    assert dm2.files.path("test") == root / "enwik8" / "enwik8.zip"
    assert gets == ["/enwik8.zip"]


def test_enwik8_bad_checksum_keeps_nothing(server, fresh):
    url, www, _ = server
    (www / "enwik8.zip").write_bytes(b"PK\x05\x06" + bytes(18))  # a valid empty zip, not THE file
    root = fresh / "data"
    with pytest.raises(DataError) as e:
        corpora.find_corpus("enwik8", str(root), source="auto", base_url=url)
    msg = str(e.value)
    assert "sha256" in msg and "enwik8/enwik8.zip" in msg and "http://mattmahoney.net/dc/enwik8.zip" in msg
    assert not (root / "enwik8").exists() or not any((root / "enwik8").iterdir())


def wikitext_rows():
    # HF's rows: each line with its '\n', whitespace-only lines as ''.
    return {"train": ["", " = A = \n", "", " the cat sat \n"], "validation": ["", " the dog \n"],
            "test": [" a cat \n", ""]}


def test_wikitext_from_hub_parquet_rebuilds_the_original_files(hub, fresh, monkeypatch):
    for split, rows in wikitext_rows().items():
        hub_parquet(hub, "Salesforce/wikitext", "wikitext-2-v1", split, {"text": rows})
    expected = {"train": b" \n = A = \n \n the cat sat \n", "valid": b" \n the dog \n", "test": b" a cat \n \n"}
    for split, data in expected.items():  # pin the generated files as the canonical ones
        monkeypatch.setitem(download.PINNED, f"wikitext-2/wiki.{split}.tokens", hashlib.sha256(data).hexdigest())
    root = fresh / "data"
    dm = LMDataModule(corpus="wikitext-2", root=str(root), cache_dir=str(fresh / "cache"))
    assert dm.vocab_size == 7  # <eos> + 5 distinct train words (=, A, the, cat, sat) + <unk>
    for split, data in expected.items():
        assert (root / "wikitext-2" / f"wiki.{split}.tokens").read_bytes() == data
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".wikitext")) == []  # staging removed
    assert sorted(p.name for p in (root / "wikitext-2").iterdir()) == [f"wiki.{s}.tokens" for s in ("test", "train",
                                                                                                     "valid")]
    assert len([g for g in hub.gets if g.endswith(".parquet")]) == 3


def test_wikitext_checksum_mismatch_writes_nothing(hub, fresh):
    for split, rows in wikitext_rows().items():
        hub_parquet(hub, "Salesforce/wikitext", "wikitext-2-v1", split, {"text": rows})
    root = fresh / "data"
    with pytest.raises(DataError, match=r"(?s)rebuilt from Salesforce/wikitext/wikitext-2-v1 has sha256.*by hand"):
        corpora.find_corpus("wikitext-2", str(root), source="download")
    assert not (root / "wikitext-2").exists()
    assert [p.name for p in root.iterdir()] == [".lm-download.lock"]  # no staging or parquet left


def test_sst2_from_hub_parquet(hub, fresh):
    hub_parquet(hub, "nyu-mll/glue", "sst2", "train", {"sentence": ["a fine film ", "dull , dull "], "label": [1, 0],
                                                      "idx": [0, 1]})
    hub_parquet(hub, "nyu-mll/glue", "sst2", "validation", {"sentence": ["it 's good "], "label": [1], "idx": [0]})
    hub_parquet(hub, "nyu-mll/glue", "sst2", "test", {"sentence": ["unlabelled "], "label": [-1], "idx": [0]})
    files = find_sst2(str(fresh / "data"), "auto")
    assert files["train"].read_text() == "sentence\tlabel\na fine film \t1\ndull , dull \t0\n"  # GLUE's layout
    assert read_tsv(files["dev"]) == (["it 's good"], [1])
    assert not any("/test-" in g for g in hub.gets)  # the unlabelled test split is never fetched


def test_local_never_downloads_and_names_the_urls(fresh, monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("source: local must not download")

    monkeypatch.setattr(download, "materialise", no_network)
    monkeypatch.setattr(corpora, "materialise", no_network)
    with pytest.raises(DataError, match=r"(?s)SST-2 was not found \(data.source: local never downloads\).*train.tsv.*SST-2.zip"):
        find_sst2(str(fresh / "data"), "local")


@pytest.mark.slow
def test_fresh_clone_without_network_fails_quickstart_first_step_with_one_paragraph(tmp_path):
    """The quickstart's first `lm fit`, in a copy of the repository with no data anywhere and no network."""
    clone = tmp_path / "clone"
    for d in ("lm", "corruptions", "configs"):
        shutil.copytree(REPO / d, clone / d, ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LM_", "HF_"))}
    env.update(PYTHONPATH=str(clone), HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               LM_DATA_BASE_URL="http://127.0.0.1:9/", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "lm.cli", "fit", "--config", "configs/wikitext2/tiny.yaml",
           "--config", "configs/wikitext2/variants/softmax.yaml",
           "--trainer.default_root_dir", "runs/x", "--trainer.enable_progress_bar", "false"]
    p = subprocess.run(cmd, cwd=clone, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    err = p.stderr[p.stderr.index("lm: error:"):]
    assert err.strip().count("\n") == 0  # one paragraph
    for needle in ("wikitext-2 is not on this machine", "wikitext-2/wiki.train.tokens", str(clone / "data"),
                   "https://wikitext.smerity.com/wikitext-2-v1.zip", "data.root", "LM_DATA_DIR"):
        assert needle in err, needle
    assert not (clone / "data" / "wikitext-2").exists()


def test_corrupt_takes_the_data_options(tmp_path):
    """`lm corrupt --corpus ... --split ...` finds the split like `lm fit` does (here: a local root)."""
    import json

    from lm.cli import main

    root = tmp_path / "data"
    (root / "wikitext-2").mkdir(parents=True)
    test = " the cat sat on the mat \n \n a dog ran far away today \n"
    for split in ("train", "valid", "test"):
        (root / "wikitext-2" / f"wiki.{split}.tokens").write_text(test)
    assert main(["corrupt", "--corpus", "wikitext-2", "--split", "test", "--root", str(root), "--source", "local",
                 "--rate", "0.5", "--out_dir", str(tmp_path / "out")]) == 0
    [manifest] = [p for p in (tmp_path / "out").rglob("*.json")]
    m = json.loads(manifest.read_text())
    assert m["source_sha256"] == hashlib.sha256(test.encode()).hexdigest()
    assert m["n_swaps"] > 0
