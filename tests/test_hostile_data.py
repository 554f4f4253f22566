"""Issue 31 (classes 2, 4, 6, 7) and issue 30, data side: requests the machine cannot hold, data accepted that
should not be, a raw traceback, leftovers of killed downloads, and the hub download without ``datasets``.
Each case failed on the code before it: it is refused with one paragraph (no traceback, nothing written), or
the leftover is gone. ``scripts/hostile.sh`` runs this module with tests/test_hostile.py."""

from __future__ import annotations

import hashlib
import io
import json
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import torch
import helpers
from helpers import train_tiny
from hub_server import HubServer, parquet_bytes, serve_dir

import lm.data.corpora as corpora
import lm.data.download as download
import lm.data.sst2_files as sst2_files
from lm.cli import main
from lm.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One tiny trained run (2 steps of helpers.write_config's model: 2 layers, 2 heads), its data and caches."""
    return train_tiny(tmp_path_factory.mktemp("hostile-data"))


def refused(capsys, world, argv, *needles) -> str:
    """helpers.refused, strictly: exit 2 and a one-line `lm: error:` paragraph."""
    return helpers.refused(capsys, world, argv, *needles, exact=True)


# ----- class 2: one window-memory guard for every command -------------------------------------------------
def test_guard_names_the_largest_window_that_fits():
    from lm.data.window_memory import Window, check_windows, largest_fitting

    # 2 rows x 2 heads x 1000 x 1000 keys x 4 bytes = 16,000,000 bytes > 10,000,000. The suggestion keeps half
    # the device for the rest: 16 T^2 <= 5,000,000 -> T = 559 (559^2 = 312,481 <= 312,500 < 560^2).
    w = Window("--tgt_len", "--batch_size", T=1000, batch=2)
    with pytest.raises(ConfigError, match="needs at least 0.0 GiB") as e:
        check_windows([w], heads=2, have=10_000_000)
    assert "Lower --tgt_len to at most 559" in str(e.value) and "or lower --batch_size" in str(e.value)
    check_windows([w], heads=2, have=16_000_000)  # exactly enough: accepted
    # With memory keys: 1 x 1 x T x (T + 100) x 4 <= 4,000,000 -> T(T+100) <= 1,000,000 -> T = 951.
    assert largest_fitting(Window("t", "b", 1, 1, mem=100), heads=1, have=4_000_000) == 951
    assert 951 * 1051 <= 1_000_000 < 952 * 1052


def test_evaluate_window_larger_than_the_machine(world, capsys, tmp_path):
    refused(capsys, world, ["evaluate", "--ckpts", str(world["ckpt"]), "--root", str(world["data"]), "--corruptions",
                            "", "--accelerator", "cpu", "--tgt_len", "10000000", "--out", str(tmp_path / "ev")],
            "GiB", "Lower --tgt_len", "to at most")
    assert not (tmp_path / "ev").exists()  # refused before the output folder is made


@pytest.mark.parametrize("option, value", [("--seq_len", "200000"), ("--passage_len", "100000")])
def test_analyze_window_larger_than_the_machine(world, capsys, tmp_path, option, value):
    # lm analyze keeps every layer's attention weights: 2 layers x 4 windows x 2 heads x 200000^2 x 4 bytes.
    refused(capsys, world, ["analyze", "--ckpt", str(world["ckpt"]), "--root", str(world["data"]), option, value,
                            "--out", str(tmp_path / "an")], "GiB", f"Lower {option} to at most", "all 2 layers")
    assert not (tmp_path / "an").exists()


# ----- class 4: data and values accepted that should not be -----------------------------------------------
def test_analyze_passage_start_beyond_the_split(world, capsys, tmp_path):
    refused(capsys, world, ["analyze", "--ckpt", str(world["ckpt"]), "--root", str(world["data"]),
                            "--passage_start", "10000000", "--out", str(tmp_path / "an")],
            "--passage_start 10000000", "beyond the test split")
    assert not (tmp_path / "an" / "analysis.json").exists()


def test_analyze_refuses_non_finite_weights(world, capsys, tmp_path):
    # Before: analysis.json got `NaN` (invalid JSON) in every metric, with exit 0.
    ck = torch.load(world["ckpt"], map_location="cpu", weights_only=True)
    key = next(k for k in ck["state_dict"] if k.endswith("qkv.weight"))
    ck["state_dict"][key] = torch.full_like(ck["state_dict"][key], float("nan"))
    bad = tmp_path / "nan.ckpt"
    torch.save(ck, bad)
    refused(capsys, world, ["analyze", "--ckpt", str(bad), "--root", str(world["data"]), "--out", str(tmp_path / "an")],
            "non-finite", key.split(".")[-2])
    assert not (tmp_path / "an").exists()


def test_analyze_writes_strict_json(world, tmp_path, monkeypatch):
    import lm.analysis.cli as analysis

    real = analysis.analyze_model

    def with_a_nan(*a, **k):  # a degenerate metric (e.g. a constant window) must not become the token NaN
        r = real(*a, **k)
        r["collapse_per_layer"][0] = float("nan")
        return r

    monkeypatch.setattr(analysis, "analyze_model", with_a_nan)
    assert main(["analyze", "--ckpt", str(world["ckpt"]), "--root", str(world["data"]), "--out", str(tmp_path)]) == 0

    def no_constants(c):
        raise AssertionError(f"invalid JSON constant {c}")

    result = json.loads((tmp_path / "analysis.json").read_text(), parse_constant=no_constants)
    assert result["collapse_per_layer"][0] is None and isinstance(result["collapse_per_layer"][1], float)


def write_sst2(root: Path, sentence: str) -> None:
    d = root / "glue" / "SST-2"
    d.mkdir(parents=True)
    for split in ("train", "dev"):
        (d / f"{split}.tsv").write_text(f"sentence\tlabel\n{sentence} \t1\n")


def test_sst2_explicit_missing_root_never_uses_another_copy(tmp_path, monkeypatch):
    other = tmp_path / "other"
    write_sst2(other, "from another copy")
    monkeypatch.setenv("LM_DATA_DIR", str(other))
    nowhere = tmp_path / "nowhere"
    with pytest.raises(DataError, match=r"(?s)does not exist.*nowhere"):
        sst2_files.find_sst2(str(nowhere), "local")
    # With `auto`, SST-2 is downloaded INTO the root named (as the corpora are), not taken from $LM_DATA_DIR.
    asked = []

    def materialise(name, root=None, base_url=None, searched=None):
        asked.append((name, root))
        write_sst2(Path(root), "downloaded")
        return Path(root)

    monkeypatch.setattr(sst2_files, "materialise", materialise)
    files = sst2_files.find_sst2(str(nowhere), "auto")
    assert asked == [("sst2", str(nowhere))] and files["train"] == nowhere / "glue" / "SST-2" / "train.tsv"


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """No data root but the ones a test names: no ./data, no $LM_DATA_DIR, no ../shared/data."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LM_DATA_DIR", raising=False)
    monkeypatch.setattr(corpora, "repo_root", lambda: tmp_path / "clone")


@pytest.fixture
def hub(fresh, monkeypatch):
    with HubServer() as h:
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        yield h


def sst2_hub(hub, train: dict) -> None:
    for split, cols in (("train", train), ("validation", {"sentence": ["it 's good "], "label": [1]})):
        hub.add("nyu-mll/glue", f"sst2/{split}-00000-of-00001.parquet", parquet_bytes(cols))


@pytest.mark.parametrize("train, needle", [
    ({"sentence": ["a fine\nfilm "], "label": [1]}, "line break"),
    ({"sentence": ["a fine film "], "label": [-1]}, "the label -1"),
], ids=["embedded-newline", "label-minus-one"])
def test_sst2_hub_rows_are_checked_before_publishing(hub, tmp_path, train, needle):
    sst2_hub(hub, train)
    root = tmp_path / "data"
    with pytest.raises(DataError, match=rf"(?s)could not be downloaded.*{needle}"):
        sst2_files.find_sst2(str(root), "auto")
    assert not (root / "glue" / "SST-2").exists()  # nothing published: the next `auto` run downloads again
    assert sorted(p.name for p in root.iterdir()) == [".lm-download.lock"]  # no staging, no parquet left
    sst2_hub(hub, {"sentence": ["a fine film "], "label": [1]})  # the hub is fixed
    files = sst2_files.find_sst2(str(root), "auto")
    assert sst2_files.read_tsv(files["train"]) == (["a fine film"], [1])


def test_hub_download_needs_no_datasets(hub, tmp_path, monkeypatch):
    # Issue 30: huggingface_hub + pyarrow fetch and read the parquet files; `datasets` is not imported.
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    sst2_hub(hub, {"sentence": ["a fine film ", "dull "], "label": [1, 0]})
    files = sst2_files.find_sst2(str(tmp_path / "data"), "auto")
    assert files["train"].read_text() == "sentence\tlabel\na fine film \t1\ndull \t0\n"
    assert not list((tmp_path / "data").glob(".*partial*"))  # the parquet files were scratch


def test_enwik8_zip_member_larger_than_enwik8_is_not_inflated(tmp_path):
    # A member declaring 10^8 + 1 bytes (zeros: ~100 KB zipped) was inflated whole into memory; a 1 GiB one
    # took 1 GiB. Now it is refused from its declared size.
    zpath = tmp_path / "data" / "enwik8" / "enwik8.zip"
    zpath.parent.mkdir(parents=True)
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z, z.open("enwik8", "w") as f:
        block = bytes(1 << 22)
        left = 100_000_001
        while left:
            f.write(block[:min(left, len(block))])
            left -= min(left, len(block))
    files = corpora.find_corpus("enwik8", str(tmp_path / "data"), source="local")
    with pytest.raises(DataError, match=r"declares 100,000,001 bytes, more than enwik8's 100,000,000"):
        files.read_bytes("test")


# ----- class 6: a raw traceback ----------------------------------------------------------------------------
def test_corrupt_out_dir_that_cannot_be_created(world, capsys, tmp_path):
    src = world["data"] / "wikitext-2" / "wiki.test.tokens"
    refused(capsys, world, ["corrupt", str(src), "--out_dir", "/proc/x/corruptions"], "--out_dir /proc/x",
            "cannot be written", "Nothing was written")


# ----- class 7: leftovers of killed downloads ---------------------------------------------------------------
def test_stale_partial_downloads_are_removed_by_the_next_download(fresh, tmp_path, monkeypatch):
    """A killed `fetch` leaves `.enwik8.zip.*.part`, a killed hub download `.<name>.partial.*` folders. The next
    download into that root holds the download lock, so none of them can belong to a live download."""
    raw = b"<page> hello </page>\n" * 200
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("enwik8", raw)
    www = tmp_path / "www"
    www.mkdir()
    (www / "enwik8.zip").write_bytes(buf.getvalue())
    monkeypatch.setattr(download, "ENWIK8_ZIP_SHA256", hashlib.sha256(buf.getvalue()).hexdigest())
    root = tmp_path / "data"
    stale = [root / "enwik8" / ".enwik8.zip.k1ll3d.part", root / ".sst2.partial.abc123" / "train.tsv",
             root / ".wikitext-2.hub.partial.def456" / "wikitext-2-v1" / "train-00000-of-00001.parquet"]
    for p in stale:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half a download")
    found = {}
    with serve_dir(www) as (url, _):
        # A live download (here: this thread) holds the root's lock: its `.part` files are left alone; the next
        # download waits for the lock and only then clears what a killed holder left.
        with download._locked(root):
            later = threading.Thread(target=lambda: found.update(
                files=corpora.find_corpus("enwik8", str(root), source="auto", base_url=url)))
            later.start()
            later.join(timeout=1.0)
            assert later.is_alive() and all(p.exists() for p in stale)
        later.join(timeout=60)
    files = found["files"]
    assert files.read_bytes("train") == raw[: len(raw) * 90 // 100]
    assert sorted(p.name for p in root.iterdir()) == [".lm-download.lock", "enwik8"]
    assert sorted(p.name for p in (root / "enwik8").iterdir()) == ["enwik8.zip"]
