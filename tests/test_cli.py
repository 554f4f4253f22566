"""Bad input through the `lm` command gets one clear paragraph and exit code 2, never a traceback.

Every case runs the real entry point in-process (``lm.cli.main([...])``) and reads stderr. Errors the
project raises itself print ``lm: error: <one paragraph>``; errors jsonargparse reports while parsing
(an unknown config key) exit through ``SystemExit(2)`` with its own message, which must name the key.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
import yaml

from lm.cli import main, user_error
from lm.errors import ConfigError, LMError

from helpers import train_tiny, write_config, write_corpus

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny `lm fit` run (2 steps) shared by the checkpoint cases."""
    return train_tiny(tmp_path_factory.mktemp("trained"))


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing lands in the checkout
    data = write_corpus(tmp_path / "data")
    return {"tmp": tmp_path, "data": data,
            "cfg": write_config(tmp_path / "cfg.yaml", tmp_path / "run", data, tmp_path / "cache")}


def fails(capsys, argv: list[str], *needles: str) -> str:
    """Run `lm argv`; expect exit code 2 (returned, or SystemExit(2) from jsonargparse), one `lm: error:`
    paragraph (or jsonargparse's `error:` line) containing every needle, and no traceback."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # jsonargparse reports parse errors itself
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert "error:" in err
    msg = err[err.index("error:"):]
    for needle in needles:
        assert needle in msg, f"{needle!r} not in:\n{msg}"
    return msg


def fit(cfg, *extra: str) -> list[str]:
    return ["fit", "--config", str(cfg), *extra]


# ----- configuration -------------------------------------------------------------------------------
def test_unknown_attention_name_suggests_closest(env, capsys):
    fails(capsys, fit(env["cfg"], "--model.attention.name", "ellipitcal"),
          "Unknown attention variant 'ellipitcal'", "Did you mean 'elliptical'?", "Valid choices:")


def test_unknown_attention_option_suggests_closest(env, capsys):
    fails(capsys, fit(env["cfg"], "--model.attention.name", "elliptical", "--model.attention.options",
                      "{estimater: causal}"),
          "no option 'estimater'", "Did you mean 'estimator'?")


def test_unknown_ffn_name_suggests_closest(env, capsys):
    # FFNConfig validates in __post_init__, inside jsonargparse, which wraps the error in a ValueError
    # about Union subtypes; the CLI digs the ConfigError out.
    msg = fails(capsys, fit(env["cfg"], "--model.ffn.name", "swich"), "Unknown ffn 'swich'", "Did you mean 'switch'?")
    assert "Union" not in msg


def test_incompatible_options_name_the_fix(env, capsys):
    fails(capsys, fit(env["cfg"], "--model.pos", "absolute"), "model.mem_len > 0 needs relative positions",
          "model.pos: relative")


@pytest.mark.parametrize("argv, key", [
    (["--model.d_modle", "32"], "model.d_modle"),
    (["--model.optim.lrr", "0.1"], "lrr"),
])
def test_config_typo_on_the_command_line_names_the_key(env, capsys, argv, key):
    fails(capsys, fit(env["cfg"], *argv), key)


def test_config_typo_in_yaml_names_the_key(env, capsys):
    cfg = yaml.safe_load(env["cfg"].read_text())
    cfg["model"]["n_layr"] = cfg["model"].pop("n_layer")
    bad = env["tmp"] / "typo.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    fails(capsys, fit(bad), "model.n_layr")


def test_lightning_misconfiguration_is_reported_without_traceback(env, capsys):
    fails(capsys, fit(env["cfg"], "--trainer.val_check_interval", "-3"), "val_check_interval")


# ----- data ----------------------------------------------------------------------------------------
def test_missing_corpus_split_lists_places_and_how_to_get_it(env, capsys):
    (env["data"] / "wikitext-2" / "wiki.train.tokens").unlink()
    fails(capsys, fit(env["cfg"]), "The train split of wikitext-2 was not found", "Looked in",
          str(env["data"] / "wikitext-2" / "wiki.train.tokens"), "data.root")


def test_empty_corpus_file(env, capsys):
    (env["data"] / "wikitext-2" / "wiki.valid.tokens").write_bytes(b"")
    fails(capsys, fit(env["cfg"]), "wiki.valid.tokens", "is empty", "Re-download")


def test_corpus_in_the_wrong_encoding(env, capsys):
    with open(env["data"] / "wikitext-2" / "wiki.train.tokens", "ab") as f:
        f.write(" café naïve \n".encode("latin-1"))
    fails(capsys, fit(env["cfg"]), "wiki.train.tokens is not valid UTF-8", "byte offset", "(0xe9)", "iconv")


def test_malformed_sst2_row_names_the_line(env, capsys):
    sst = env["tmp"] / "sst" / "glue" / "SST-2"
    sst.mkdir(parents=True)
    (sst / "train.tsv").write_text("sentence\tlabel\na fine film \t1\nbad \t0\nno label here\nok \t1\n")
    (sst / "dev.tsv").write_text("sentence\tlabel\ngood \t1\n")
    fails(capsys, ["finetune", "fit", "--config", str(CONFIGS / "sst2" / "finetune.yaml"), "--model.vocab", "fresh",
                   "--data.root", str(env["tmp"] / "sst"), "--trainer.default_root_dir", str(env["tmp"] / "ft"),
                   "--trainer.accelerator", "cpu"],
          "train.tsv, line 4", "expected 2 tab-separated columns", "'no label here'")


def test_corruption_rate_outside_unit_interval(env, capsys):
    src = env["data"] / "wikitext-2" / "wiki.test.tokens"
    fails(capsys, ["corrupt", "--src", str(src), "--rate", "1.5", "--out_dir", str(env["tmp"] / "c")],
          "1.5", "[0, 1]")
    assert not (env["tmp"] / "c").exists()


# ----- checkpoints ---------------------------------------------------------------------------------
def test_checkpoint_from_another_vocabulary(trained, tmp_path, capsys):
    other = write_corpus(tmp_path / "other", seed=1, prefix="v", n_words=55)
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "run", other, tmp_path / "cache")
    fails(capsys, ["test", "--config", str(cfg), "--ckpt_path", str(trained["ckpt"])],
          "trained with another vocabulary", "--data.tokenizer")


def test_checkpoint_from_another_architecture(trained, tmp_path, capsys):
    # Lightning rebuilds the model from the checkpoint's hyper-parameters; when its tensors do not fit
    # them (renamed/reshaped parameters), `lm test` and `lm evaluate` say so instead of failing in torch.
    ck = torch.load(trained["ckpt"], map_location="cpu", weights_only=True)
    ck["hyper_parameters"]["d_inner"] = 48
    odd = tmp_path / "odd.ckpt"
    torch.save(ck, odd)
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "run", trained["data"], tmp_path / "cache")
    for argv in (["test", "--config", str(cfg), "--ckpt_path", str(odd)],
                 ["evaluate", "--ckpts", str(odd), "--root", str(trained["data"]), "--corruptions", "",
                  "--out", str(tmp_path / "ev")]):
        fails(capsys, argv, "does not fit this model", "shape mismatch", "config.yaml")


def test_checkpoint_of_another_model_class(trained, tmp_path, capsys):
    ck = torch.load(trained["ckpt"], map_location="cpu", weights_only=True)
    ck["hyper_parameters"] = {"pretrained": "x.ckpt", "vocab": "reuse", "pooling": "last"}  # a classifier's
    clf = tmp_path / "clf.ckpt"
    torch.save(ck, clf)
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "run", trained["data"], tmp_path / "cache")
    fails(capsys, ["test", "--config", str(cfg), "--ckpt_path", str(clf)],
          "another kind of model than LanguageModel", "pooling", "lm finetune")
    # ... and the other way round: an LM checkpoint given to `lm finetune validate`.
    fails(capsys, ["finetune", "validate", "--config", str(CONFIGS / "sst2" / "finetune.yaml"), "--model.vocab",
                   "fresh", "--trainer.default_root_dir", str(tmp_path / "ft"), "--ckpt_path", str(trained["ckpt"])],
          "another kind of model than SequenceClassifier", "--model.pretrained")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing", "pickled-object"])
def test_unreadable_checkpoint(trained, tmp_path, capsys, damage):
    """`lm test/validate/fit --ckpt_path` and `lm evaluate --ckpts` of a bad file: one paragraph, before
    LightningCLI's own torch.load of the file would raise OSError/RuntimeError/UnpicklingError."""
    bad = tmp_path / f"{damage}.ckpt"
    data = trained["ckpt"].read_bytes()
    if damage == "truncated":  # e.g. an interrupted copy
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        bad.write_text("not a checkpoint")
    elif damage == "pickled-object":  # not loadable with weights_only
        ck = torch.load(trained["ckpt"], map_location="cpu", weights_only=True)
        ck["extra"] = argparse.Namespace(a=1)
        torch.save(ck, bad)
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "run", trained["data"], tmp_path / "cache")
    want = {"missing": ("no such file",), "pickled-object": ("cannot be loaded safely",)}.get(
        damage, ("Cannot read checkpoint", "truncated"))
    for sub in ("test", "validate", "fit"):
        fails(capsys, [sub, "--config", str(cfg), "--ckpt_path", str(bad)], str(bad), *want)
    if damage != "pickled-object":
        want = ("does not exist",) if damage == "missing" else ("Cannot read checkpoint", "truncated")
        fails(capsys, ["evaluate", "--ckpts", str(bad), "--root", str(trained["data"]), "--out", str(tmp_path / "ev")],
              str(bad), *want)


def test_unreadable_last_checkpoint_on_resume(trained, tmp_path, capsys):
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "run", trained["data"], tmp_path / "cache")
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(trained["ckpt"].read_bytes()[:1000])
    fails(capsys, ["fit", "--config", str(cfg), "--ckpt_path", "last"], str(last), "Cannot read checkpoint",
          "truncated")


def test_checkpoints_that_are_fine_still_work(trained, tmp_path, capsys):
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "run", trained["data"], tmp_path / "cache")
    assert main(["test", "--config", str(cfg), "--ckpt_path", str(trained["ckpt"])]) == 0
    assert (tmp_path / "run" / "results" / "test-segments.json").is_file()


def test_fit_saves_resolved_config_and_train_summary_beside_the_run(trained, tmp_path):
    run = trained["tmp"] / "run"
    saved = yaml.safe_load((run / "config.yaml").read_text())  # beside checkpoints/, not only in lightning_logs
    assert saved["model"]["d_model"] == 16 and saved["trainer"]["max_steps"] == 2
    assert saved["data"]["root"] == str(trained["data"])
    summary = json.loads((run / "results" / "train.json").read_text())
    assert summary["global_step"] == 2 and len(summary["sessions"]) == 1
    assert summary["tokens"] == 2 * 2 * 8  # steps x batch_size x tgt_len
    assert summary["tokens_per_s"] == pytest.approx(summary["tokens"] / summary["train_s"], rel=0.01)
    # the saved config reproduces the run: `lm validate --config <run>/config.yaml` works from it
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["trainer"]["default_root_dir"] = str(tmp_path / "again")
    (tmp_path / "again.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["validate", "--config", str(tmp_path / "again.yaml"), "--ckpt_path", str(trained["ckpt"])]) == 0


def test_last_checkpoint_holds_the_final_step_between_validations(env):
    # Validation every 3 steps, 5 steps in all: the last 2 steps happen after the last validation save.
    assert main(fit(env["cfg"], "--trainer.max_steps", "5", "--trainer.val_check_interval", "3",
                    "--trainer.limit_val_batches", "1")) == 0
    ckpt = torch.load(env["tmp"] / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 5


# ----- the error filter itself ---------------------------------------------------------------------
def test_user_error_digs_out_wrapped_lm_errors_and_leaves_bugs_alone():
    try:
        try:
            raise ConfigError("the real problem")
        except ConfigError as inner:
            raise ValueError("Does not validate against any of the Union subtypes") from inner
    except ValueError as outer:
        assert isinstance(user_error(outer), LMError) and str(user_error(outer)) == "the real problem"
    assert user_error(KeyError("a bug")) is None


def test_a_bug_keeps_its_traceback(env, monkeypatch):
    import lm.data.datamodule as dm

    def boom(self, *a, **k):
        raise KeyError("a genuine bug")

    monkeypatch.setattr(dm.LMDataModule, "prepare_data", boom)
    with pytest.raises(KeyError, match="a genuine bug"):
        main(fit(env["cfg"]))


@pytest.mark.parametrize("argv, typo", [
    (["fit", "--config", "configs/wikitext2/tiny.yaml", "--trainer.max_step", "5", "--print_config"], "--trainer.max_step"),
    (["finetune", "fit", "--config", "configs/sst2/finetune.yaml", "--trainer.max_epoch", "1", "--print_config"],
     "--trainer.max_epoch"),
    (["evaluate", "--ckpt", "x.ckpt"], "--ckpt"),
    (["analyze", "--ck", "x.ckpt"], "--ck"),
])
def test_misspelt_option_is_an_error_not_a_prefix_match(capsys, monkeypatch, argv, typo):
    # argparse's default would read `--trainer.max_step 5` as `--trainer.max_steps 5` without a word.
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    fails(capsys, argv, "unrecognized arguments", typo)
