"""Every shipped recipe is valid: the large ones parse against the real signatures (`--print_config`,
no data needed), every tiny WikiText-2 variant (configs/wikitext2/tiny.yaml + variants/<name>.yaml)
resolves to what its full-copy recipe did before the overlays, and trains and tests through the real
`lm fit` / `lm test` (shrunk: 2 steps of 2 x 16 tokens on generated data, so the CPU suite stays fast)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from helpers import write_corpus  # the shared tiny WikiText-2 generator

from lm.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
LM_RECIPES = sorted(p for d in ("wikitext2", "wikitext103", "enwik8") for p in (CONFIGS / d).glob("*.yaml"))
TINY_BASE = CONFIGS / "wikitext2" / "tiny.yaml"
VARIANTS = sorted((CONFIGS / "wikitext2" / "variants").glob("*.yaml"))
BEFORE = json.loads((Path(__file__).parent / "data" / "tiny_recipes_before_overlays.json").read_text())["recipes"]
# The one deliberate change since that snapshot (issue 20's attribution, docs/study.md): 8 heads x 32 instead of 4 x 64.
HEADS_NOW = {"model.n_head": 8, "model.d_head": 32}
# And issue 30's: the precision resolves per machine (bf16-mixed only where bf16 is native; lm/precision.py).
PRECISION_NOW = {"trainer.precision": "auto"}
HEADS_4X64 = CONFIGS / "wikitext2" / "options" / "heads_4x64.yaml"


def test_there_are_recipes():
    assert {p.stem for p in VARIANTS} == set(BEFORE)  # the 14 former tiny_<name>.yaml, one overlay each
    assert len(LM_RECIPES) >= 12


def test_every_registered_attention_variant_has_a_tiny_overlay():
    from lm.model.attention import ATTENTION

    assert set(ATTENTION) <= {p.stem for p in VARIANTS}, sorted(set(ATTENTION) - {p.stem for p in VARIANTS})


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def print_config(capsys, *configs) -> dict:
    with pytest.raises(SystemExit) as e:
        main(["fit", *(a for c in configs for a in ("--config", str(c))), "--print_config"])
    assert e.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("overlay", VARIANTS, ids=lambda p: p.stem)
def test_overlay_resolves_to_the_former_full_recipe(overlay, capsys):
    """Field by field at every key the former full copy set (the rest are the signatures' defaults, the
    same code either way); the overlay sets nothing that copy did not, and gets its own run folder."""
    before = BEFORE[overlay.stem]
    now = flat(print_config(capsys, TINY_BASE, overlay))
    assert {k: now[k] for k in before} == {**before, **HEADS_NOW, **PRECISION_NOW}
    assert set(flat(yaml.safe_load(overlay.read_text()))) <= set(before)


@pytest.mark.parametrize("variant", ["softmax", "elliptical", "elliptical_switch"])
def test_heads_4x64_option_restores_the_former_recipe(variant, capsys):
    """The old geometry stays one overlay away: with it, every key of the former full recipe is back."""
    before = BEFORE[variant]
    assert before["model.n_head"] == 4 and before["model.d_head"] == 64
    overlay = CONFIGS / "wikitext2" / "variants" / f"{variant}.yaml"
    for order in ((HEADS_4X64, overlay), (overlay, HEADS_4X64)):
        now = flat(print_config(capsys, TINY_BASE, *order))
        assert {k: now[k] for k in before} == {**before, **PRECISION_NOW}


def test_every_variant_trains_into_its_own_folder():
    base = yaml.safe_load(TINY_BASE.read_text())["trainer"]["default_root_dir"]
    folders = [(yaml.safe_load(p.read_text()).get("trainer") or {}).get("default_root_dir", base) for p in VARIANTS]
    assert len(set(folders)) == len(VARIANTS), folders


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
@pytest.mark.parametrize("overlay", VARIANTS, ids=lambda p: p.stem)
def test_tiny_recipe_fits_and_tests(overlay, corpus, tmp_path):
    recipe = ["--config", str(TINY_BASE), "--config", str(overlay)]
    run = tmp_path / "run"
    shrink = ["--data.root", str(corpus), "--data.cache_dir", str(tmp_path / "cache"), "--data.batch_size", "2",
              "--data.tgt_len", "16", "--data.eval.batch_size", "2", "--model.cutoffs", "[20]",
              "--trainer.default_root_dir", str(run), "--trainer.max_steps", "2", "--trainer.precision", "32-true",
              "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "2", "--trainer.val_check_interval", "1",
              "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    assert main(["fit", *recipe, *shrink]) == 0
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert main(["test", *recipe, *shrink, "--ckpt_path", str(run / "checkpoints" / "last.ckpt")]) == 0
    result = json.loads((run / "results" / "test-segments.json").read_text())
    assert result["ppl"] > 1 and result["tokens_scored"] > 0
