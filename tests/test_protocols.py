"""Evaluation protocols (REFERENCE §6): every target scored exactly once, context guarantees,
memory continuity, rank sharding. Tokens are ``arange(N)``, so a token's value is its index."""

from __future__ import annotations

import itertools

import pytest
import torch

from lm.config import EvalConfig
from lm.errors import ConfigError, DataError
from lm.data.protocols import eval_batches

SIZES = [2, 3, 17, 100, 101]
WINDOWS = [1, 4, 7]
BATCHES = [1, 3, 10]


def described(cfg: EvalConfig, train_tgt_len: int, mem_len: int = 0) -> dict:
    """The protocol as every result records it (``LanguageModel.protocol_description``)."""
    from lm.tasks.lm_module import LanguageModel

    arch = dict(n_layer=1, d_model=8, n_head=1, d_head=8, d_inner=8, adaptive=False, cutoffs=[])
    pos = "relative" if mem_len else "absolute"
    return LanguageModel(vocab_size=10, tgt_len=train_tgt_len, pos=pos, mem_len=mem_len, eval=cfg,
                         **arch).protocol_description()


def scored(batches) -> list[int]:
    """Indices of all scored targets; checks each scored target is the next token of its input."""
    out = []
    for b in batches:
        assert b["input"].shape == b["target"].shape == b["mask"].shape
        assert b["input"].dtype == torch.long and b["mask"].dtype == torch.bool
        m = b["mask"]
        assert torch.equal(b["target"][m], b["input"][m] + 1)
        out += b["target"][m].tolist()
    return out


def assert_exactly_once(idx: list[int], n: int):
    assert len(idx) == n - 1 and sorted(idx) == list(range(1, n))


def cfgs():
    for protocol in ("segments", "memory"):
        for T, B in itertools.product(WINDOWS, BATCHES):
            yield EvalConfig(protocol=protocol, tgt_len=T, batch_size=B)
    for T, B in itertools.product(WINDOWS, BATCHES):
        for S in sorted({1, min(3, T), T}):
            yield EvalConfig(protocol="sliding", tgt_len=T, stride=S, batch_size=B)


@pytest.mark.parametrize("n", SIZES)
def test_every_target_scored_exactly_once(n):
    toks = torch.arange(n)
    for cfg in cfgs():
        batches = eval_batches(toks, cfg, train_tgt_len=999)
        got = list(batches)
        assert len(got) == len(batches), cfg
        assert_exactly_once(scored(got), n)
        assert scored(batches) == scored(got)  # re-iterable, same batches again


def test_first_flags_and_shapes():
    toks = torch.arange(30)
    seg = list(eval_batches(toks, EvalConfig(protocol="segments", batch_size=2), train_tgt_len=4))
    assert all(b["first"] for b in seg) and all(b["input"].shape[1] == 4 for b in seg)
    # segments start at multiples of T: 0, 4, 8, ...; the last (29 targets = 7*4 + 1) is padded
    assert [r[0] for b in seg for r in b["input"].tolist()] == list(range(0, 29, 4))
    assert seg[-1]["mask"].tolist()[-1] == [True, False, False, False]
    mem = list(eval_batches(toks, EvalConfig(protocol="memory", batch_size=3), train_tgt_len=4))
    assert [b["first"] for b in mem] == [True] + [False] * (len(mem) - 1)
    sl = list(eval_batches(toks, EvalConfig(protocol="sliding", stride=2, batch_size=4), train_tgt_len=8))
    assert all(b["first"] for b in sl) and all(b["input"].shape[1] == 8 for b in sl)


def test_eval_tgt_len_overrides_training_length():
    b = next(iter(eval_batches(torch.arange(50), EvalConfig(tgt_len=5), train_tgt_len=8)))
    assert b["input"].shape[1] == 5
    assert described(EvalConfig(), 8)["window"] == 8


@pytest.mark.parametrize("n,T,B", [(100, 4, 3), (101, 7, 10), (17, 4, 1), (40, 3, 4)])
def test_memory_streams_are_continuous(n, T, B):
    # Row i of batch j+1 continues row i of batch j: the memory always holds the preceding text.
    batches = list(eval_batches(torch.arange(n), EvalConfig(protocol="memory", batch_size=B), train_tgt_len=T))
    L = -(-(n - 1) // B)
    assert len(batches) == -(-L // T)
    assert all(b["input"].shape[1] == T for b in batches[:-1]) and batches[-1]["input"].shape[1] == L - (len(batches) - 1) * T
    for i in range(B):
        row = torch.cat([b["input"][i] for b in batches])
        mask = torch.cat([b["mask"][i] for b in batches])
        k = int(mask.sum())
        assert mask[:k].all() and not mask[k:].any()  # padding only at the end of a stream
        assert row[:k].tolist() == list(range(i * L, i * L + k))


@pytest.mark.parametrize("n,T,S", [(100, 8, 1), (100, 8, 3), (101, 7, 7), (57, 6, 4), (9, 6, 2)])
def test_sliding_context(n, T, S):
    cfg = EvalConfig(protocol="sliding", tgt_len=T, stride=S, batch_size=4)
    for b in eval_batches(torch.arange(n), cfg, train_tgt_len=T):
        for i, t in b["mask"].nonzero().tolist():
            target = int(b["target"][i, t])
            # the window holds exactly the t+1 tokens before the target, contiguous
            assert b["input"][i, : t + 1].tolist() == list(range(target - t - 1, target))
            if target > T:  # outside the first window
                assert t >= T - S
    d = described(cfg, T)
    assert d == {"protocol": "sliding", "window": T, "stride": S, "mem_len": 0, "clamp_len": -1,
                 "batch_size": 4, "normalised_by": "token"}


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("n", [17, 100, 101])
def test_rank_sharding_covers_everything_once(world, n):
    toks = torch.arange(n)
    for cfg in cfgs():
        if cfg.protocol == "memory" and cfg.batch_size < world:
            with pytest.raises(ConfigError, match="world_size"):
                eval_batches(toks, cfg, 999, rank=0, world_size=world)
            continue
        per_rank = [eval_batches(toks, cfg, 999, rank=r, world_size=world) for r in range(world)]
        assert len({len(p) for p in per_rank}) == 1, cfg  # same number of steps on every rank (DDP-safe)
        assert_exactly_once(sum((scored(p) for p in per_rank), []), n)
        for p in per_rank:
            assert len(list(p)) == len(p)


def test_memory_result_independent_of_world_size():
    toks = torch.arange(101)
    cfg = EvalConfig(protocol="memory", tgt_len=4, batch_size=4)
    one = list(eval_batches(toks, cfg, 4))
    two = [list(eval_batches(toks, cfg, 4, rank=r, world_size=2)) for r in range(2)]
    for j, b in enumerate(one):
        assert torch.equal(torch.cat([two[0][j]["input"], two[1][j]["input"]]), b["input"])


def test_describe_and_errors():
    assert described(EvalConfig(protocol="memory", mem_len=640, clamp_len=400), 64, mem_len=150) == {
        "protocol": "memory", "window": 64, "stride": 64, "mem_len": 640, "clamp_len": 400, "batch_size": 10,
        "normalised_by": "token"}
    assert described(EvalConfig(protocol="memory"), 64, mem_len=150)["mem_len"] == 150
    assert described(EvalConfig(), 64)["mem_len"] == 0
    with pytest.raises(ConfigError, match="stride"):
        eval_batches(torch.arange(10), EvalConfig(protocol="sliding", stride=9), train_tgt_len=4)
    with pytest.raises(DataError, match="at least 2 tokens"):
        eval_batches(torch.arange(1), EvalConfig(), train_tgt_len=4)
