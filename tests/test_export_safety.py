"""Hostile and mistaken inputs to `lm export`, `lm generate` and `lm.load` (issue 31): each is refused with one
paragraph (exit 2, no traceback) before anything is allocated or overwritten."""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_api import TEXT, WORDS, save_ckpt, tiny

import lm
from lm.api import Model
from lm.cli import main
from lm.data.tokenizer import Vocab
from lm.errors import CheckpointError, ConfigError


@pytest.fixture
def exported(tmp_path) -> Path:
    ckpt = save_ckpt(tiny("softmax", "relative"), tmp_path / "m.ckpt")
    assert main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "exp")]) == 0
    return tmp_path / "exp"


def refused(argv, capsys, *needles) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("lm: error: "), err
    for n in needles:
        assert n in err, (n, err)
    return err


def edit_config(folder: Path, edit) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(edit(cfg)))


# ----- unbounded allocation ---------------------------------------------------------------------
@pytest.mark.parametrize("key, value, needle", [("n_layer", 100_000, "n_layer 100000"),
                                                ("d_model", 10_000_000, "shape mismatches")])
def test_sizes_are_checked_against_the_header_before_building(exported, key, value, needle, monkeypatch):
    edit_config(exported, lambda c: {**c, "hyper_parameters": {**c["hyper_parameters"], key: value}})
    from lm.tasks.lm_module import LanguageModel

    devices, init = [], LanguageModel.__init__

    @functools.wraps(init)
    def spy(self, *a, **k):
        devices.append(torch.empty(0).device.type)  # the default device the model would be built on
        return init(self, *a, **k)

    monkeypatch.setattr(LanguageModel, "__init__", spy)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=needle):
        lm.load(exported)
    assert time.perf_counter() - start < 5  # was: 9.5 GB and minutes for n_layer, 1.3 TB asked for d_model
    assert set(devices) <= {"meta"}  # never built with real memory


def test_a_model_that_cannot_be_built_on_meta_gets_the_size_check(tmp_path):
    ckpt = save_ckpt(tiny("performer"), tmp_path / "m.ckpt")
    assert main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "p")]) == 0
    folder = tmp_path / "p"
    assert lm.load(folder).score(TEXT).tokens == 16  # Performer reads its seed at construction: no meta build
    edit_config(folder, lambda c: {**c, "hyper_parameters": {**c["hyper_parameters"], "d_model": 10_000_000}})
    with pytest.raises(CheckpointError, match="d_model 10000000"):
        lm.load(folder)


def test_generate_streams_its_output(exported, monkeypatch, capsys):
    """`--max_new_tokens 1000000000` must show text at once: each token is printed when it is sampled."""
    sampled, seen = [], []
    real = Model._sample

    def counting(*a):
        sampled.append(1)
        if len(sampled) > 50:
            raise KeyboardInterrupt  # the user's Ctrl-C
        return real(*a)

    monkeypatch.setattr(Model, "_sample", staticmethod(counting))

    class Out:
        def write(self, s):
            if s.strip():
                seen.append(len(sampled))
        def flush(self):
            pass

    monkeypatch.setattr("sys.stdout", Out())
    assert main(["generate", "--ckpt", str(exported), "--prompt", "w1", "--max_new_tokens", "1000000000"]) == 130
    assert seen[:3] == [0, 1, 2]  # the prompt, then the first word after one sample, the second after two


# ----- silent acceptance ------------------------------------------------------------------------
def nan_ckpt(tmp_path) -> Path:
    module = tiny("softmax")
    with torch.no_grad():
        module.net.layers[0].norm1.weight[3] = float("nan")
    return save_ckpt(module, tmp_path / "nan.ckpt")


def test_export_refuses_non_finite_weights_and_writes_nothing(tmp_path, capsys):
    refused(["export", "--ckpt", str(nan_ckpt(tmp_path)), "--out", str(tmp_path / "out")], capsys,
            "non-finite", "layers.0.norm1.weight")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".lm-export*"))


def test_generate_refuses_non_finite_weights(tmp_path, exported, capsys):
    refused(["generate", "--ckpt", str(nan_ckpt(tmp_path)), "--prompt", "w1"], capsys, "non-finite")
    weights = load_file(exported / "model.safetensors")
    weights["layers.1.norm2.bias"][0] = float("inf")
    save_file(weights, exported / "model.safetensors")
    refused(["generate", "--ckpt", str(exported), "--prompt", "w1"], capsys, "non-finite", "layers.1.norm2.bias")


def test_integer_weights_are_refused_not_cast(exported):
    weights = load_file(exported / "model.safetensors")
    weights["layers.0.attn.o.weight"] = weights["layers.0.attn.o.weight"].long()
    save_file(weights, exported / "model.safetensors")
    with pytest.raises(CheckpointError, match="layers.0.attn.o.weight as I64"):
        lm.load(exported)


# ----- overwrites -------------------------------------------------------------------------------
def test_export_refuses_a_folder_that_is_not_an_export(tmp_path, capsys):
    ckpt = save_ckpt(tiny("softmax"), tmp_path / "m.ckpt")
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "README.md").write_text("my project\n")
    (mine / "config.json").write_text('{"mine": 1}')
    refused(["export", "--ckpt", str(ckpt), "--out", str(mine)], capsys, "--force", "README.md")
    assert (mine / "README.md").read_text() == "my project\n" and (mine / "config.json").read_text() == '{"mine": 1}'
    assert sorted(p.name for p in mine.iterdir()) == ["README.md", "config.json"]  # no temporary left
    # a previous export is replaced without --force; --force writes the four files and keeps the others
    assert main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "e")]) == 0
    assert main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "e")]) == 0
    assert main(["export", "--ckpt", str(ckpt), "--out", str(mine), "--force", "true"]) == 0
    assert sorted(p.name for p in mine.iterdir()) == ["README.md", "config.json", "model.safetensors", "tokenizer.json"]
    assert lm.load(mine).score(TEXT).token_nll == lm.load(tmp_path / "e").score(TEXT).token_nll
    (tmp_path / "afile").write_text("x")
    refused(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "afile")], capsys, "is a file")


def test_exported_files_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        ckpt = save_ckpt(tiny("softmax"), tmp_path / "m.ckpt")
        assert main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "e")]) == 0
        folder = tmp_path / "e"
    finally:
        os.umask(old)
    assert {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()} == {
        "README.md": 0o644, "config.json": 0o644, "model.safetensors": 0o644, "tokenizer.json": 0o644}
    assert folder.stat().st_mode & 0o777 == 0o755


# ----- raw tracebacks ---------------------------------------------------------------------------
MALFORMED = {
    "unknown key": (lambda c: {**c, "hyper_parameters": {**c["hyper_parameters"], "n_layerz": 2}}, "n_layerz"),
    "missing hyper_parameters": (lambda c: {k: v for k, v in c.items() if k != "hyper_parameters"}, "missing"),
    "list hyper_parameters": (lambda c: {**c, "hyper_parameters": [1, 2]}, "list"),
    "top-level list": (lambda c: [c], "JSON list"),
    "vocab a string": (lambda c: {**c, "vocab": "words"}, "'vocab'"),
    "format_version a string": (lambda c: {**c, "format_version": "1"}, "version '1'"),
    "n_layer a string": (lambda c: {**c, "hyper_parameters": {**c["hyper_parameters"], "n_layer": "2"}}, "wrong type"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_export_config_is_one_paragraph(exported, case, capsys):
    edit, needle = MALFORMED[case]
    edit_config(exported, edit)
    refused(["generate", "--ckpt", str(exported), "--prompt", "w1"], capsys, needle, "lm export")


def test_non_utf8_export_config(exported, capsys):
    (exported / "config.json").write_bytes(b'{"format": "\xff"}')
    refused(["generate", "--ckpt", str(exported)], capsys, "not UTF-8")


def test_bad_sampling_and_text_inputs(exported, capsys):
    model = lm.load(exported)
    greedy = model.generate("w1 w2", max_new_tokens=8, temperature=0)
    # a tiny temperature is (almost) greedy, not a NaN in torch.multinomial
    assert model.generate("w1 w2", max_new_tokens=8, temperature=1e-45) == greedy
    assert main(["generate", "--ckpt", str(exported), "--prompt", "w1 w2", "--max_new_tokens", "8",
                 "--temperature", "1e-45"]) == 0
    assert capsys.readouterr().out == "w1 w2" + greedy + "\n"
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ConfigError, match="temperature"):
            model.generate("w1", temperature=bad)
    with pytest.raises(ConfigError, match="top_p"):
        model.generate("w1", top_p=0)
    for call in (model.generate, model.score):
        with pytest.raises(ConfigError, match="lone surrogate"):
            call("w1 \udcff w2")
        with pytest.raises(ConfigError, match="not UTF-8"):
            call(b"w1 \xff")
    refused(["generate", "--ckpt", str(exported), "--prompt", "w1 \udcff"], capsys, "lone surrogate", "UTF-8")
    (exported.parent / "p.txt").write_bytes(b"w1 \xfe w2")
    refused(["generate", "--ckpt", str(exported), "--prompt_file", str(exported.parent / "p.txt")], capsys,
            "not UTF-8", "byte 0xfe")


def test_bad_devices(exported, capsys):
    refused(["generate", "--ckpt", str(exported), "--device", "banana"], capsys, "'banana'", "Use 'cpu'")
    if not torch.cuda.is_available():
        refused(["generate", "--ckpt", str(exported), "--device", "cuda"], capsys, "'cuda'", "CUDA available: False")


def test_a_foreign_vocabulary_in_a_checkpoint(tmp_path, capsys):
    module = tiny("softmax")
    path = tmp_path / "foreign.ckpt"
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict(),
                "lm_vocab": Vocab.from_words(WORDS + ["extra1", "extra2"]).state()}, path)
    refused(["generate", "--ckpt", str(path), "--prompt", "w1"], capsys, "34 entries", "32 rows", "another run")


def test_a_huge_window_scores_a_short_text_without_allocating_it(exported):
    edit_config(exported, lambda c: {**c, "hyper_parameters": {**c["hyper_parameters"], "tgt_len": 10**12}})
    model = lm.load(exported)  # tgt_len shapes no weight: the export is valid
    s = model.score("w1 w2 w3")  # one window of the text's own length, not 10^12 positions
    assert s.tokens == 4 and s.nll > 0
