"""Issue 30 (portable download lock) and issue 31 class 3 (`complete` in every result file) for the commands
that lacked them: `lm analyze`'s ``analysis.json`` and `lm corrupt`'s manifests.

The download lock is ``filelock`` now, so a platform without ``fcntl`` (Windows) still holds a real lock and
clears what killed downloads left. ``analysis.json`` and the manifests are written last, atomically, with
``complete: true``; a stop (a real SIGTERM/SIGINT of this process through ``lm.cli.main``'s handlers) leaves
no new file, and a cached manifest from before the field is rebuilt.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import filelock  # noqa: F401  (imported while fcntl is importable: the lock library binds it at import)
import pytest
from helpers import train_tiny
from test_corrupt_cli import write_test_split

from corruptions import manifest as manifest_mod
from corruptions.manifest import corrupt_file
from lm.analysis import cli as analysis_cli
from lm.cli import main
from lm.data import download

pytestmark = pytest.mark.usefixtures("single_thread")


# ----- issue 30: the download lock ------------------------------------------------------------------------
def test_stale_partials_are_removed_without_fcntl(tmp_path, monkeypatch):
    """Before: without ``fcntl`` (Windows) the lock was a no-op and nothing left by a killed download was ever
    removed. ``filelock`` locks there too, so the next download clears them; the finished corpus stays."""
    root = tmp_path / "data"
    zipped = root / "enwik8" / "enwik8.zip"
    zipped.parent.mkdir(parents=True)
    zipped.write_bytes(b"a finished download")
    stale = [root / "enwik8" / ".enwik8.zip.k1ll3d.part", root / ".wikitext-2.partial.abc123" / "wiki.train.tokens"]
    for p in stale:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half a download")
    monkeypatch.setitem(sys.modules, "fcntl", None)  # `import fcntl` raises ImportError, as on Windows
    assert download.materialise("enwik8", root) == root.resolve()
    assert not any(p.exists() for p in stale) and not (root / ".wikitext-2.partial.abc123").exists()
    assert zipped.read_bytes() == b"a finished download"
    assert sorted(p.name for p in root.iterdir()) == [".lm-download.lock", "enwik8"]


def test_download_waits_for_a_filelock_holder(tmp_path):
    """The lock is the same ``filelock`` any other process (or tool) would take on the file: while it is held,
    a download into that root waits (it does not fetch twice, nor remove the holder's ``.part`` files)."""
    import threading

    root = tmp_path / "data"
    (root / "enwik8").mkdir(parents=True)
    (root / "enwik8" / "enwik8.zip").write_bytes(b"zip")
    live = root / "enwik8" / ".enwik8.zip.live.part"
    live.write_bytes(b"being written")
    done = threading.Event()
    with filelock.FileLock(root / ".lm-download.lock"):
        t = threading.Thread(target=lambda: (download.materialise("enwik8", root), done.set()), daemon=True)
        t.start()
        assert not done.wait(1.0) and live.exists()
        live.unlink()  # the holder finishes its file
    assert done.wait(30)


# ----- issue 31: lm analyze ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("leftovers"))


def analyze_argv(world, out) -> list[str]:
    return ["analyze", "--ckpt", str(world["ckpt"]), "--root", str(world["data"]), "--source", "local",
            "--seq_len", "8", "--n_sequences", "3", "--passage_len", "6", "--out", str(out)]


def test_analysis_json_says_complete(world, capsys, tmp_path):
    out = tmp_path / "an"
    assert main(analyze_argv(world, out)) == 0, capsys.readouterr().err[-2000:]
    r = json.loads((out / "analysis.json").read_text())
    assert r["complete"] is True and r["checkpoint"] == str(world["ckpt"]) and r["n_sequences"] == 3
    assert list((out / "tb").iterdir())  # written before analysis.json, which comes last


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_stopped_analyze_writes_no_analysis_json(world, capsys, tmp_path, monkeypatch, sig, code):
    """A stop after the metrics and plots, just before the last outputs: exit 128 + signal and no new
    ``analysis.json`` (before: it was written before the TensorBoard scalars, so it existed after such a stop);
    an earlier run's file is left byte for byte."""
    out = tmp_path / "an"
    assert main(analyze_argv(world, out)) == 0
    before = (out / "analysis.json").read_bytes()
    (out / "analysis.json").unlink()
    real, sent = analysis_cli._tensorboard, []

    def stop_here(*a, **kw):
        sent.append(1)
        os.kill(os.getpid(), sig)
        real(*a, **kw)

    monkeypatch.setattr(analysis_cli, "_tensorboard", stop_here)
    assert main(analyze_argv(world, out)) == code and sent, capsys.readouterr().err[-2000:]
    assert not (out / "analysis.json").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".analysis.json")]  # no temporary file either
    (out / "analysis.json").write_bytes(before)
    assert main(analyze_argv(world, out)) == code
    assert (out / "analysis.json").read_bytes() == before


# ----- issue 31: lm corrupt ---------------------------------------------------------------------------------
def only_manifest(out_dir) -> dict:
    (path,) = out_dir.glob("*/manifest.json")
    return json.loads(path.read_text())


def test_corrupt_manifest_says_complete(tmp_path, capsys):
    src = write_test_split(tmp_path / "clean")
    assert main(["corrupt", str(src), "--rate", "0.1", "--out_dir", str(tmp_path / "c")]) == 0
    m = only_manifest(tmp_path / "c")
    assert m["complete"] is True and m["n_swaps"] > 0


def test_stopped_corrupt_leaves_no_manifest_and_the_next_run_rebuilds(tmp_path, capsys, monkeypatch):
    src = write_test_split(tmp_path / "clean")
    argv = ["corrupt", str(src), "--rate", "0.1", "--out_dir", str(tmp_path / "c")]
    real = manifest_mod.atomic_write_json

    def stop_before_manifest(*a, **kw):  # the corrupted file is in place; the manifest comes next
        os.kill(os.getpid(), signal.SIGTERM)
        real(*a, **kw)

    monkeypatch.setattr(manifest_mod, "atomic_write_json", stop_before_manifest)
    assert main(argv) == 143, capsys.readouterr().err[-2000:]
    (folder,) = (tmp_path / "c").iterdir()
    assert [p.name for p in folder.iterdir()] == ["wiki.test.tokens"]  # the output, no manifest
    partial = (folder / "wiki.test.tokens").read_bytes()
    monkeypatch.setattr(manifest_mod, "atomic_write_json", real)
    res = corrupt_file(src, rate=0.1, out_dir=tmp_path / "c")
    assert res.cached is False and res.manifest["complete"] is True and only_manifest(tmp_path / "c")["complete"]
    assert res.path.read_bytes() == partial  # deterministic: the rebuilt output is the same


def test_cached_manifest_without_complete_is_rebuilt(tmp_path):
    """A manifest written before the field existed is not reused as it is: rebuilt, same bytes, same path."""
    src = write_test_split(tmp_path / "clean")
    first = corrupt_file(src, rate=0.1, out_dir=tmp_path / "c")
    old = {k: v for k, v in json.loads(first.manifest_path.read_text()).items() if k != "complete"}
    first.manifest_path.write_text(json.dumps(old))
    again = corrupt_file(src, rate=0.1, out_dir=tmp_path / "c")
    assert again.cached is False and again.path == first.path and again.manifest_path == first.manifest_path
    assert json.loads(again.manifest_path.read_text())["complete"] is True
    assert again.path.read_bytes() == first.path.read_bytes()
    assert corrupt_file(src, rate=0.1, out_dir=tmp_path / "c").cached is True  # and reused from then on
