"""Rolling validation (data.eval.val_protocol: rolling, lm/data/rolling.py): the MoE authors' validation during
training, block by block against hand-computed positions, its state across a save/restore, and two real `lm fit`
validations (plus a resume) scoring consecutive blocks with the memory carried."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from lm.config import EvalConfig, ModelConfig
from lm.data.protocols import check_protocol
from lm.data.rolling import RollingBlocks
from lm.errors import ConfigError, DataError

T, B, C = 4, 2, 16  # C = 4T: every pass through the columns is the blocks r, r+4, r+8 (C - T = 12)
SEED = 7


def rolling(n_tokens=B * C + 1, val_blocks=2, seed=SEED, **kw) -> RollingBlocks:
    cfg = EvalConfig(protocol="full_eval", batch_size=B, val_protocol="rolling", val_blocks=val_blocks)
    return RollingBlocks(torch.arange(n_tokens), cfg, T, seed=seed, **kw)


def starts(batches) -> list[tuple[int, bool]]:
    """(block start, starts from a zero cache) of each batch; tokens are their own index, so input[0, 0] = start."""
    out = []
    for b in batches:
        s = int(b["input"][0, 0])
        # Column 1 starts C tokens later; the target is the next token; every target is scored.
        assert b["input"][1].tolist() == list(range(C + s, C + s + T))
        assert torch.equal(b["target"], b["input"] + 1) and b["mask"].all() and b["real"].all()
        out.append((s, b["first"]))
    return out


def offsets(k: int) -> list[int]:
    # The documented draw: restart k lands at default_rng([seed, k]).integers(T).
    return [int(np.random.default_rng([SEED, i]).integers(T)) for i in range(k)]


def test_validated_blocks_roll_on_and_restart():
    r = offsets(3)
    assert all(0 <= x < T for x in r) and len(set(r)) > 1  # this seed restarts at different offsets
    v = rolling()
    got = [starts(v) for _ in range(5)]
    # Pass 0 = blocks 0, 4, 8 (12 >= C - T ends it), then pass k starts at r[k-1] with a zeroed cache.
    assert got == [[(0, True), (4, False)],
                   [(8, False), (r[0], True)],
                   [(r[0] + 4, False), (r[0] + 8, False)],
                   [(r[1], True), (r[1] + 4, False)],
                   [(r[1] + 8, False), (r[2], True)]]
    assert v.state_dict()["restarts"] == 3 and v.state_dict()["pos"] == r[2] + 4


def test_blocks_per_validation_capped_at_the_column_and_tail_dropped():
    # Their cap: min(val_blocks, ceil(C / T)) = 4; the last token (N mod B = 1) is never read.
    v = rolling(val_blocks=100)
    assert len(v) == 4 and [s for s, _ in starts(v)] == [0, 4, 8, offsets(1)[0]]
    assert v.scored == B * T * 4 and v.targets == B * C


def test_dry_run_hands_out_the_next_blocks_without_moving():
    dry = [True]
    v = rolling(dry_run=lambda: dry[0])
    assert starts(v) == [(0, True), (4, False)]
    dry[0] = False
    assert starts(v) == [(0, True), (4, False)] and starts(v) == [(8, False), (offsets(1)[0], True)]


def test_position_survives_save_and_restore():
    v = rolling()
    for _ in range(2):
        list(v)
    buf = io.BytesIO()
    torch.save({"LMDataModule": {"rolling_val": v.state_dict()}}, buf)
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)["LMDataModule"]["rolling_val"]
    w = rolling(seed=12345)  # another seed at build time: the restored one wins
    w.load_state_dict(state)
    assert [starts(w) for _ in range(3)] == [starts(v) for _ in range(3)]
    with pytest.raises(ConfigError, match="Cannot resume the rolling validation"):
        rolling(n_tokens=B * C + 3).load_state_dict(state)  # other validation data


def test_a_partial_validation_stops_at_the_last_block_handed_out():
    v = rolling(val_blocks=3)
    it = iter(v)
    next(it)
    assert v.state_dict()["pos"] == 4  # limit_val_batches 1: the next validation goes on at block 4
    assert starts(v)[0] == (4, False)


def test_config_errors():
    with pytest.raises(ConfigError, match="val_blocks"):
        EvalConfig(val_protocol="rolling")
    with pytest.raises(ConfigError, match="needs eval.val_protocol: rolling"):
        EvalConfig(val_blocks=3)
    with pytest.raises(ConfigError, match="val_protocol"):
        EvalConfig(val_protocol="roling", val_blocks=3)
    e = EvalConfig(val_protocol="rolling", val_blocks=3)
    with pytest.raises(ConfigError, match="model with memory"):
        check_protocol(e, ModelConfig(pos="absolute", n_layer=2))
    check_protocol(e, ModelConfig(pos="relative", mem_len=8, n_layer=2))
    with pytest.raises(DataError, match="shorter than two blocks"):
        rolling(n_tokens=B * (2 * T - 1) + 1)


def test_ranks_take_their_own_columns_and_the_same_positions():
    cfg = EvalConfig(protocol="full_eval", batch_size=4, val_protocol="rolling", val_blocks=3)
    tokens = torch.arange(4 * C + 3)  # columns of C: column j starts at j * C
    ranks = [RollingBlocks(tokens, cfg, T, rank=r, world_size=2, seed=SEED) for r in (0, 1)]
    for _ in range(3):
        b0, b1 = (list(r) for r in ranks)
        for x, y in zip(b0, b1):
            p = int(x["input"][0, 0])
            assert x["input"][:, 0].tolist() == [p, C + p] and y["input"][:, 0].tolist() == [2 * C + p, 3 * C + p]
            assert x["first"] == y["first"]
    with pytest.raises(ConfigError, match="world_size"):
        RollingBlocks(tokens, EvalConfig(batch_size=1, val_protocol="rolling", val_blocks=1), T, 0, 2)


@pytest.mark.parametrize("fn,active", [("fit", True), ("validate", False), ("test", False)])
def test_only_the_validations_of_a_fit_roll(fn, active):
    from types import SimpleNamespace

    from lm.data.rolling import rolling_active

    trainer = SimpleNamespace(state=SimpleNamespace(fn=SimpleNamespace(value=fn)))
    assert rolling_active(trainer, EvalConfig(val_protocol="rolling", val_blocks=1)) is active
    assert rolling_active(trainer, EvalConfig()) is False
    assert rolling_active(None, EvalConfig(val_protocol="rolling", val_blocks=1)) is False


MOE_RECIPES = ["wikitext103/switch_large", "wikitext103/switch_medium", "wikitext103/switch_medium_softmax",
               "wikitext103/glam_medium", "wikitext103/glam_small", "enwik8/switch_medium"]


@pytest.mark.parametrize("recipe", MOE_RECIPES)
def test_moe_recipes_validate_as_the_authors(recipe):
    from pathlib import Path

    cfg = yaml.safe_load((Path(__file__).parents[1] / "configs" / f"{recipe}.yaml").read_text())
    e = cfg["data"]["eval"]
    # Their scripts: --nbatches 1000 (a validation every 1000 steps) -> max(1, 1000 // 10) = 100 blocks of
    # --batch-sz columns; best checkpoint by that loss (RunCheckpoint's default monitor, val/loss).
    assert cfg["trainer"]["val_check_interval"] == 1000 and cfg["trainer"]["max_steps"] % 1000 == 0
    assert (e["val_protocol"], e["val_blocks"], e["batch_size"]) == ("rolling", max(1, 1000 // 10),
                                                                     cfg["data"]["batch_size"])
    assert "ckpt_path best" in (Path(__file__).parents[1] / "configs" / f"{recipe}.yaml").read_text()


# ------------------------------------------------------------------------------------ a real fit (slow)
SEEN: list[tuple[bool, int, list[int], bool, bool]] = []


class RecordValBlocks(Callback):
    """Records every validation batch: (sanity check, global step, first row of the input, first, memory in)."""

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        SEEN.append((trainer.sanity_checking, trainer.global_step, batch["input"][0].tolist(), bool(batch["first"]),
                     pl_module._eval_mems is not None))


@pytest.mark.slow
def test_fit_validations_score_consecutive_blocks_and_resume(tmp_path):
    from helpers import write_config, write_corpus

    from lm import checkpoint
    from lm.cli import main
    from lm.data.datamodule import LMDataModule

    data = write_corpus(tmp_path / "data")
    cfg_path = write_config(tmp_path / "cfg.yaml", tmp_path / "run", data, tmp_path / "cache")
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["trainer"].update(val_check_interval=1, num_sanity_val_steps=2, limit_val_batches=None,
                          callbacks=[{"class_path": "test_rolling_val.RecordValBlocks"}])
    cfg["data"]["eval"].update(protocol="memory", val_protocol="rolling", val_blocks=2)
    cfg_path.write_text(yaml.safe_dump(cfg))
    SEEN.clear()
    assert main(["fit", "--config", str(cfg_path)]) == 0  # max_steps 2: a validation after each step

    # The columns, built here from the split's token ids: 2 columns of N // 2, blocks of 8.
    dm = LMDataModule(corpus="wikitext-2", root=str(data), cache_dir=str(tmp_path / "cache"),
                      tokenizer=str(tmp_path / "run" / "tokenizer.json"))
    tokens = dm.tokens("valid")
    col = tokens[: len(tokens) // 2 * 2].reshape(2, -1)[0].tolist()
    assert len(col) - 8 > 40  # blocks 0..40 all come before the first restart
    block = {p: col[p : p + 8] for p in range(0, 48, 8)}
    # Sanity check: a dry run of the first validation's blocks; validation 1: blocks 0, 8 from a zero cache;
    # validation 2 goes on at 16, 24 with the memory validation 1 ended with.
    assert SEEN == [(True, 0, block[0], True, False), (True, 0, block[8], False, True),
                    (False, 1, block[0], True, False), (False, 1, block[8], False, True),
                    (False, 2, block[16], False, True), (False, 2, block[24], False, True)]
    ckpt = checkpoint.read(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert ckpt["LMDataModule"]["rolling_val"]["pos"] == 32 and ckpt["lm_val_mems"] is not None

    # A resumed fit (Lightning runs no sanity check then) validates where the interrupted one would have, with the
    # restored memory.
    SEEN.clear()
    assert main(["fit", "--config", str(cfg_path), "--ckpt_path", "last", "--trainer.max_steps", "3"]) == 0
    assert SEEN == [(False, 3, block[32], False, True), (False, 3, block[40], False, True)]
