"""Issue 31 class 1: a checkpoint never runs code. URLs are refused before anything is fetched, local files are
unpickled only with ``weights_only=True``, and every entry point (fit, validate, test, evaluate, finetune, analyze,
export, generate, ``lm.load``, Lightning's own restore) says so in one paragraph.

The hostile file is a real pickle whose payload would create a marker file (``builtins.open(marker, "w")``);
it is served by an HTTP server on 127.0.0.1 started here, which also counts the requests it gets.
"""

from __future__ import annotations

import builtins
import re
from pathlib import Path

import pytest
import torch
from helpers import one_paragraph, train_tiny
from hub_server import serve_dir
from test_sst2 import make_lm_ckpt, sentences, write_tsv

import lm
from lm import checkpoint
from lm.cli import main
from lm.errors import CheckpointError, ConfigError

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py: tiny models, one thread
ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this calls open(marker, "w"): the marker file exists iff the pickle's code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def evil_ckpt(path: Path, marker: Path, like: Path | None = None) -> Path:
    """A checkpoint (a real one's contents when ``like`` is given) with the payload inside."""
    ckpt = torch.load(like, weights_only=True) if like else {"state_dict": {}}
    ckpt["hyper_parameters"] = {**ckpt.get("hyper_parameters", {}), "payload": Payload(marker)}
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny trained run, an evil checkpoint next to it, and an HTTP server serving it (requests counted)."""
    tmp = tmp_path_factory.mktemp("untrusted")
    w = train_tiny(tmp)
    marker = tmp / "PWNED"
    serve = tmp / "served"
    serve.mkdir()
    evil_ckpt(serve / "evil.ckpt", marker, like=w["ckpt"])
    with serve_dir(serve) as (url, hits):
        w.update(marker=marker, hits=hits, url=f"{url}evil.ckpt", local_evil=serve / "evil.ckpt")
        yield w


def assert_refused_url(world, capsys, argv):
    msg = one_paragraph(capsys, main(argv))
    assert world["url"] in msg and "not a local file" in msg and "Download it first" in msg, msg
    assert not world["marker"].exists(), "the pickle's payload ran"
    assert world["hits"] == [], f"the URL was fetched: {world['hits']}"


def test_the_served_pickle_really_runs_code_when_unpickled_unsafely(world, tmp_path):
    """The guard test: the payload is live (a weights_only=False load creates the marker)."""
    marker = tmp_path / "marker"
    torch.load(evil_ckpt(tmp_path / "e.ckpt", marker), weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("sub", ["test", "validate"])
def test_validate_and_test_refuse_a_url(world, capsys, sub):
    assert_refused_url(world, capsys, [sub, "--config", str(world["cfg"]), "--ckpt_path", world["url"]])


def test_fit_refuses_a_url_before_touching_the_run_dir(world, capsys, tmp_path):
    run = tmp_path / "fitrun"
    assert_refused_url(world, capsys, ["fit", "--config", str(world["cfg"]), "--ckpt_path", world["url"],
                                       "--trainer.default_root_dir", str(run)])
    assert not run.exists()


def test_fit_with_a_url_into_a_used_run_dir_is_refused(world, capsys):
    # the URL used to skip both the checkpoint check and the used-run-dir refusal
    assert_refused_url(world, capsys, ["fit", "--config", str(world["cfg"]), "--ckpt_path", world["url"]])


def test_evaluate_analyze_export_generate_refuse_a_url(world, capsys, tmp_path):
    for argv in (["evaluate", "--ckpts", world["url"], "--corruptions", "", "--out", str(tmp_path / "ev")],
                 ["analyze", "--ckpt", world["url"], "--out", str(tmp_path / "an")],
                 ["export", "--ckpt", world["url"], "--out", str(tmp_path / "ex")],
                 ["generate", "--ckpt", world["url"], "--prompt", "w1"]):
        assert_refused_url(world, capsys, argv)
    assert not (tmp_path / "ev" / "results.json").exists()


@pytest.fixture
def sst2_root(tmp_path) -> Path:
    d = tmp_path / "data"
    write_tsv(d / "glue" / "SST-2" / "train.tsv", sentences(16, 0))
    write_tsv(d / "glue" / "SST-2" / "dev.tsv", sentences(8, 1))
    return d


def test_finetune_refuses_a_url(world, capsys, tmp_path, sst2_root, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = ["--config", str(ROOT / "configs" / "sst2" / "finetune.yaml"), "--data.root", str(sst2_root),
              "--trainer.default_root_dir", str(tmp_path / "sst2")]
    assert_refused_url(world, capsys, ["finetune", "fit", *common, "--model.pretrained", world["url"]])
    make_lm_ckpt(tmp_path / "lm.ckpt")
    assert_refused_url(world, capsys, ["finetune", "validate", *common, "--model.pretrained",
                                       str(tmp_path / "lm.ckpt"), "--ckpt_path", world["url"]])


def test_lm_load_refuses_a_url(world):
    with pytest.raises(CheckpointError, match="not a local file"):
        lm.load(world["url"])
    assert not world["marker"].exists() and world["hits"] == []


@pytest.mark.parametrize("argv", [["test"], ["validate"], ["evaluate"]])
def test_a_local_pickle_laden_file_is_named_as_such(world, capsys, tmp_path, argv):
    ck = str(world["local_evil"])
    argv = argv + (["--ckpts", ck, "--corruptions", "", "--out", str(tmp_path / "ev")] if argv[0] == "evaluate"
                   else ["--config", str(world["cfg"]), "--ckpt_path", ck])
    msg = one_paragraph(capsys, main(argv))
    assert "pickled Python objects" in msg and "unsupported GLOBAL\" io.open" in msg, msg
    assert "was NOT loaded" in msg and not world["marker"].exists()


def test_lm_load_names_a_pickle_laden_file(world):
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        lm.load(world["local_evil"])
    assert not world["marker"].exists()


def test_file_url_is_read_as_its_local_path(world, capsys):
    assert checkpoint.local_path("file:///tmp/x%20y.ckpt") == Path("/tmp/x y.ckpt")
    assert checkpoint.local_path("file://localhost/tmp/a.ckpt") == Path("/tmp/a.ckpt")
    url = world["ckpt"].resolve().as_uri()
    code, err = main(["test", "--config", str(world["cfg"]), "--ckpt_path", url]), capsys.readouterr().err
    assert code == 0, err[-2000:]
    msg = one_paragraph(capsys, main(["test", "--config", str(world["cfg"]), "--ckpt_path",
                                      world["local_evil"].resolve().as_uri()]))
    assert "pickled Python objects" in msg and not world["marker"].exists()


@pytest.mark.parametrize("url", ["https://example.com/m.ckpt", "s3://bucket/m.ckpt", "file://otherhost/m.ckpt",
                                 "registry:org/model", "registry"])
def test_other_urls_are_refused_without_network(url):
    with pytest.raises(CheckpointError, match="not a local file"):
        checkpoint.read(url)


def test_trainer_entry_points_force_weights_only(world, tmp_path, monkeypatch):
    """Lightning's restore, called directly (a script), with torch told to default to unsafe loading: still
    weights_only=True, so the payload never runs; a URL and weights_only=False are refused."""
    from lm.data.datamodule import LMDataModule
    from lm.tasks.pretrained import load_language_model
    from lm.trainer import Trainer

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # overrides an unset (None) weights_only only
    model, _, _ = load_language_model(str(world["ckpt"]))
    dm = LMDataModule(root=str(world["data"]), tokenizer=str(world["run"] / "tokenizer.json"), tgt_len=8,
                      batch_size=2)
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, limit_test_batches=1,
                      default_root_dir=str(tmp_path))
    with pytest.raises(Exception) as e:
        trainer.test(model, datamodule=dm, ckpt_path=str(world["local_evil"]))
    assert "GLOBAL" in str(e.value) and not world["marker"].exists()
    with pytest.raises(CheckpointError, match="not a local file"):
        trainer.test(model, datamodule=dm, ckpt_path=world["url"])
    with pytest.raises(ConfigError, match="weights_only"):
        trainer.test(model, datamodule=dm, ckpt_path=str(world["ckpt"]), weights_only=False)
    assert world["hits"] == []


def test_weights_only_false_on_the_command_line_is_refused(world, capsys):
    msg = one_paragraph(capsys, main(["test", "--config", str(world["cfg"]), "--ckpt_path", str(world["ckpt"]),
                                      "--weights_only", "false"]))
    assert "--weights_only false" in msg and "drop --weights_only" in msg


def test_the_restore_reads_through_the_one_reader(world, tmp_path):
    from lm.tasks.callbacks import AtomicCheckpointIO

    with pytest.raises(CheckpointError, match="pickled Python objects"):
        AtomicCheckpointIO().load_checkpoint(world["local_evil"])
    assert AtomicCheckpointIO().load_checkpoint(world["ckpt"])["global_step"] == 2


def test_no_unsafe_torch_load_outside_the_reader():
    """Static: lm/checkpoint.py holds the package's only torch.load, and nothing says weights_only=False."""
    bad = []
    for p in sorted((ROOT / "lm").rglob("*.py")):
        text = p.read_text(encoding="utf-8")
        for pat in (r"weights_only\s*=\s*False", r"torch\.load\(", r"\bload_state_dict_from_url\(",
                    r"\bpl_load\(|cloud_io\._load\("):
            if re.search(pat, text) and (p.name != "checkpoint.py" or "False" in pat):
                bad.append(f"{p.relative_to(ROOT)}: {pat}")
    assert not bad, bad


def test_a_raw_pickle_is_refused_unpickled_and_named(world, capsys, tmp_path):
    """A file written by pickle.dump (protocol 4+, not torch.save) fails in torch's safe loader before any GLOBAL
    is reached: the message says the safe loader refused it and nothing was unpickled; no torch warning line."""
    import os
    import pickle

    marker = tmp_path / "raw-marker"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    raw = tmp_path / "raw.ckpt"
    raw.write_bytes(pickle.dumps({"state_dict": Payload()}, protocol=4))
    msg = one_paragraph(capsys, main(["test", "--config", str(world["cfg"]), "--ckpt_path", str(raw)]))
    assert "safe (weights_only) loader refused it" in msg and "NOT unpickled" in msg, msg
    assert not marker.exists()
    assert "Detected pickle protocol" not in capsys.readouterr().err
