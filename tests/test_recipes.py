"""Every shipped recipe is valid: the large ones parse against the real signatures (`--print_config`,
no data needed), and every tiny WikiText-2 recipe trains and tests through the real `lm fit` / `lm test`
(shrunk: 2 steps of 2 x 16 tokens on generated data, so the CPU suite stays fast)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from test_cli import write_corpus  # the shared tiny WikiText-2 generator

from lm.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
LM_RECIPES = sorted(p for d in ("wikitext2", "wikitext103", "enwik8") for p in (CONFIGS / d).glob("*.yaml"))
TINY = sorted((CONFIGS / "wikitext2").glob("tiny_*.yaml"))


def test_there_are_recipes():
    names = {p.stem for p in TINY}
    assert {"tiny_softmax", "tiny_elliptical", "tiny_quest", "tiny_switch", "tiny_glam"} <= names
    assert len(LM_RECIPES) >= 25


@pytest.mark.parametrize("recipe", LM_RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_recipe_parses(recipe, capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(recipe), "--print_config"])
    assert e.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    own = yaml.safe_load(recipe.read_text())
    assert printed["model"]["attention"]["name"] == own["model"].get("attention", {}).get("name", "softmax")
    assert printed["data"]["corpus"] == own["data"]["corpus"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("data"), n_words=60, lines=(80, 10, 10), min_len=4, max_len=12)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", TINY, ids=lambda p: p.stem)
def test_tiny_recipe_fits_and_tests(recipe, corpus, tmp_path):
    run = tmp_path / "run"
    shrink = ["--data.root", str(corpus), "--data.cache_dir", str(tmp_path / "cache"), "--data.batch_size", "2",
              "--data.tgt_len", "16", "--data.eval.batch_size", "2", "--model.cutoffs", "[20]",
              "--trainer.default_root_dir", str(run), "--trainer.max_steps", "2", "--trainer.precision", "32-true",
              "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "2", "--trainer.val_check_interval", "1",
              "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    assert main(["fit", "--config", str(recipe), *shrink]) == 0
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert main(["test", "--config", str(recipe), *shrink, "--ckpt_path", str(run / "checkpoints" / "last.ckpt")]) == 0
    result = json.loads((run / "results" / "test-segments.json").read_text())
    assert result["ppl"] > 1 and result["tokens_scored"] > 0
