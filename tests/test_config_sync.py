"""``LanguageModel``'s flat signature and ``ModelConfig`` are one source of truth, kept in step here.

``LanguageModel.__init__`` takes every ``ModelConfig`` field as its own argument (flat), so recipes,
saved ``config.yaml`` files and checkpoint hyper-parameters say ``model.n_layer``, not
``model.<group>.n_layer``. This test fails when a field is added, renamed, retyped or given another
default on one side only, and checks that every argument reaches the config the decoder is built from."""

from __future__ import annotations

import dataclasses
import inspect
import typing

import pytest
from torch import nn

import lm.tasks.lm_module as lm_module
from lm.config import AttentionConfig, FFNConfig, ModelConfig
from lm.tasks.lm_module import LanguageModel

TASK_ARGS = {"vocab_size", "unit", "tgt_len", "optim", "eval", "results_dir", "compile"}  # not architecture


def test_signature_has_every_model_config_field_with_its_type_and_default():
    params = dict(inspect.signature(LanguageModel.__init__).parameters)
    params.pop("self")
    hints = typing.get_type_hints(LanguageModel.__init__)
    cfg_hints = typing.get_type_hints(ModelConfig)
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    assert set(params) - TASK_ARGS == set(fields), (
        f"only in LanguageModel: {sorted(set(params) - TASK_ARGS - set(fields))}; "
        f"only in ModelConfig: {sorted(set(fields) - set(params))}")
    for name, f in fields.items():
        p = params[name]
        if f.default is not dataclasses.MISSING:
            assert p.default == f.default, f"{name}: default {p.default!r} vs ModelConfig's {f.default!r}"
            assert hints[name] == cfg_hints[name], f"{name}: type {hints[name]} vs ModelConfig's {cfg_hints[name]}"
        else:  # a mutable default (list, nested config): None in the signature stands for ModelConfig's
            assert p.default is None, f"{name}: default must be None (ModelConfig's default_factory), got {p.default!r}"
            assert hints[name] == typing.Optional[cfg_hints[name]], f"{name}: type {hints[name]} vs {cfg_hints[name]}"


@pytest.fixture
def built_cfg(monkeypatch):
    """LanguageModel with the decoder replaced by a recorder: what ModelConfig does it build from?"""
    seen = {}

    class Recorder(nn.Module):
        def __init__(self, cfg, vocab_size):
            super().__init__()
            seen["cfg"] = cfg

    monkeypatch.setattr(lm_module, "TransformerLM", Recorder)
    return seen


def test_defaults_build_the_default_model_config(built_cfg):
    LanguageModel(vocab_size=10)
    assert built_cfg["cfg"] == ModelConfig()


# Non-default values, valid together; between them every ModelConfig field differs from its default once.
RELATIVE = dict(n_layer=3, d_model=24, n_head=2, d_head=6, d_inner=40, dropout=0.2, dropatt=0.1, pos="relative",
                mem_len=5, clamp_len=7, same_length=True, norm="pre", adaptive=False, cutoffs=[3, 6], div_val=2,
                d_embed=12, tie_weight=False, init_std=0.05, ln_init="normal", dropout_placement="authors",
                weight_init="torch", embed_scale=False, attention=AttentionConfig(name="elliptical", layers="1:"),
                ffn=FFNConfig(name="switch", n_experts=2))
ABSOLUTE = dict(n_layer=2, pos="absolute", abs_pos_order="down")  # countdown positions exist only here


def test_the_value_sets_cover_every_field():
    defaults = ModelConfig()
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    covered = {k for values in (RELATIVE, ABSOLUTE) for k, v in values.items() if v != getattr(defaults, k)}
    assert covered == fields, f"give the new ModelConfig field(s) {sorted(fields - covered)} a non-default value here"


@pytest.mark.parametrize("values", [RELATIVE, ABSOLUTE], ids=["relative", "absolute"])
def test_every_argument_reaches_the_model_config(built_cfg, values):
    LanguageModel(vocab_size=10, **values)
    assert built_cfg["cfg"] == ModelConfig(**values)
