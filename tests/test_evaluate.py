"""`lm evaluate` end to end on a tiny word-level checkpoint: clean vs word-swapped test split.

A 2-step `lm fit` on a generated WikiText-2-like corpus gives the checkpoint; `lm evaluate` runs through
the real entry point (``lm.cli.main``) with the working directory in ``tmp_path`` (the corpus is found
as ``./data``, the corruption and token caches land in ``./.cache``). The clean number must be the one
`lm test` gives for the same checkpoint and protocol, the corrupted one the one `lm test` gives on the
corrupted file named in results.json, and that file must be the one its manifest describes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from helpers import write_corpus as cli_write_corpus  # the shared tiny WikiText-2 generator

from lm.cli import main

STOP = ["the", "of", "and", "a", "in", "to", "was", "is"]
SPEC = "word_swap:0.05"


def write_corpus(root: Path, seed: int = 0) -> Path:
    # stopwords in the text, so word swap has words it must skip; longer test lines for enough swaps
    return cli_write_corpus(root, seed, extra_words=tuple(STOP), lines=(120, 15, 30), max_len=25)


def write_config(path: Path, run_dir: Path, data_root: Path) -> Path:
    cfg = {
        "seed_everything": 3,
        "trainer": {"default_root_dir": str(run_dir), "max_steps": 2, "accelerator": "cpu", "devices": 1,
                    "precision": "32-true", "enable_progress_bar": False, "enable_model_summary": False,
                    "limit_val_batches": 1, "num_sanity_val_steps": 0},
        "model": {"n_layer": 2, "d_model": 16, "n_head": 2, "d_head": 8, "d_inner": 32, "dropout": 0.0,
                  "pos": "relative", "mem_len": 8, "adaptive": False, "cutoffs": []},
        # eval.batch_size 10 = lm evaluate's default, so both commands batch the windows alike
        "data": {"root": str(data_root), "cache_dir": str(path.parent / ".cache"), "batch_size": 2, "tgt_len": 8,
                 "eval": {"protocol": "segments", "batch_size": 10}},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluate")
    mp = pytest.MonkeyPatch()
    mp.chdir(tmp)  # ./data is the corpus; ./.cache holds the corruption + token caches
    mp.delenv("LM_DATA_DIR", raising=False)
    try:
        data = write_corpus(tmp / "data")
        cfg = write_config(tmp / "cfg.yaml", tmp / "run", data)
        assert main(["fit", "--config", str(cfg)]) == 0
        ckpt = tmp / "run" / "checkpoints" / "last.ckpt"
        assert main(["evaluate", "--ckpts", str(ckpt), "--corruptions", SPEC, "--out", str(tmp / "ev")]) == 0
        report = json.loads((tmp / "ev" / "results.json").read_text())
        # `lm test` of the same checkpoint, clean and on the corrupted file lm evaluate says it used
        assert main(["test", "--config", str(cfg), "--ckpt_path", str(ckpt)]) == 0
        corrupted = report["rows"][0]["results"][SPEC]["corrupted_file"]
        assert main(["test", "--config", str(cfg), "--ckpt_path", str(ckpt), "--data.test_file", corrupted]) == 0
        yield {"tmp": tmp, "data": data, "ckpt": ckpt, "report": report, "corrupted": Path(corrupted),
               "table": (tmp / "ev" / "table.md").read_text()}
    finally:
        mp.undo()


def test_evaluate_writes_results_and_table(evaluated):
    ev = evaluated["tmp"] / "ev"
    assert (ev / "results.json").is_file() and (ev / "table.md").is_file()
    report = evaluated["report"]
    assert report["split"] == "test" and report["corruption_seed"] == 0
    (row,) = report["rows"]
    assert row["checkpoint"] == str(evaluated["ckpt"]) and row["unit"] == "word"
    assert list(row["results"]) == ["clean", SPEC]
    for r in row["results"].values():
        assert r["metric"] == "ppl" and r["protocol"]["protocol"] == "segments" and r["protocol"]["window"] == 8


def test_clean_ppl_equals_lm_test(evaluated):
    clean = evaluated["report"]["rows"][0]["results"]["clean"]
    lm_test = json.loads((evaluated["tmp"] / "run" / "results" / "test-segments.json").read_text())
    assert lm_test["data"]["file"] == str(evaluated["data"] / "wikitext-2" / "wiki.test.tokens")
    assert clean["tokens_scored"] == lm_test["tokens_scored"]
    assert clean["ppl"] == pytest.approx(lm_test["ppl"], rel=1e-6)
    assert clean["protocol"] == lm_test["protocol"]


def test_corrupted_row_and_ratio(evaluated):
    res = evaluated["report"]["rows"][0]["results"]
    clean, bad = res["clean"], res[SPEC]
    assert bad["ppl"] != pytest.approx(clean["ppl"], rel=1e-4)
    assert bad["tokens_scored"] == clean["tokens_scored"]  # a swap replaces a word, it never adds one
    assert clean["ratio_vs_clean"] == 1.0
    assert bad["ratio_vs_clean"] == pytest.approx(bad["ppl"] / clean["ppl"], rel=1e-12)
    # the same numbers in table.md: | name | PPL clean | PPL word_swap:0.05 | x word_swap:0.05 |
    table = evaluated["table"].splitlines()
    assert table[0] == f"| model | PPL clean | PPL {SPEC} | x {SPEC} |"
    cells = [c.strip() for c in table[2].strip("|").split("|")]
    assert cells == ["run", f"{clean['ppl']:.3f}", f"{bad['ppl']:.3f}", f"{bad['ppl'] / clean['ppl']:.3f}"]
    # ... and the corrupted number is what `lm test` gives on that file
    tag = evaluated["corrupted"].stem
    lm_test = json.loads((evaluated["tmp"] / "run" / "results" / f"test-{tag}-segments.json").read_text())
    assert lm_test["data"]["file_sha256"] == hashlib.sha256(evaluated["corrupted"].read_bytes()).hexdigest()
    assert bad["ppl"] == pytest.approx(lm_test["ppl"], rel=1e-6)


def test_corrupted_file_is_the_one_of_the_manifest(evaluated):
    tmp, path = evaluated["tmp"], evaluated["corrupted"]
    bad = evaluated["report"]["rows"][0]["results"][SPEC]
    assert (tmp / path).resolve().is_relative_to((tmp / ".cache" / "corruptions").resolve())  # not in the repo
    manifest = json.loads((tmp / path).with_name("manifest.json").read_text())
    assert manifest["output_sha256"] == bad["corruption"]["output_sha256"] == hashlib.sha256(
        (tmp / path).read_bytes()).hexdigest()
    clean_src = evaluated["data"] / "wikitext-2" / "wiki.test.tokens"
    assert manifest["source_sha256"] == hashlib.sha256(clean_src.read_bytes()).hexdigest()
    assert (manifest["recipe"], manifest["rate"], manifest["seed"]) == ("word_swap", 0.05, 0)
    assert bad["corruption"]["n_swaps"] == manifest["n_swaps"] > 0
    # recount the swaps from the two files
    a = clean_src.read_text().split()
    b = (tmp / path).read_text().split()
    assert len(a) == len(b) and manifest["n_tokens"] == len(a)
    assert sum(x != y and y == "AAA" for x, y in zip(a, b)) == sum(x != y for x, y in zip(a, b)) == manifest["n_swaps"]


def test_spec_selects_the_sampling(evaluated):
    # `word_swap:0.05` is the default (textattack) sampling; `word_swap:0.05:exact` the other one, with
    # its own column, cache entry and manifest
    tmp = evaluated["tmp"]
    assert main(["evaluate", "--ckpts", str(evaluated["ckpt"]), "--corruptions", f"{SPEC}:exact",
                 "--out", str(tmp / "ev-exact")]) == 0
    report = json.loads((tmp / "ev-exact" / "results.json").read_text())
    assert list(report["rows"][0]["results"]) == ["clean", f"{SPEC}:exact"]
    exact = report["rows"][0]["results"][f"{SPEC}:exact"]
    default = evaluated["report"]["rows"][0]["results"][SPEC]
    assert (exact["corruption"]["sampling"], default["corruption"]["sampling"]) == ("exact", "textattack")
    assert exact["corrupted_file"] != default["corrupted_file"]
    assert exact["corruption"]["n_swaps"] >= default["corruption"]["n_swaps"]
