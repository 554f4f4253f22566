"""Data-parallel training through Lightning's DDP on CPU (gloo, 2 processes).

The worker below is this file run as a script (Lightning's ``strategy="ddp"`` re-launches the script for
rank 1). It trains a small relative-position model with segment memory on a generated WikiText-2-style
corpus for two epochs and dumps, per rank, every training row it was handed, whether its memory holds
its own rows, its validation result and a checksum of its final weights. The tests check that:

- the ranks together see every ordered stream exactly once per epoch (no duplicates, nothing missing),
  rank r the contiguous block of streams ``[r*B/W, (r+1)*B/W)`` (lm/data/streams.py), in order;
- the memory is per rank (``B/W`` rows, reset on the first batch of each epoch, holding this rank's
  own segment);
- DDP synchronised the weights (identical checksums) and the validation metric (memory protocol,
  streams sharded across ranks) covers every target of the split once;
- the real ``lm fit`` CLI runs with ``--trainer.devices 2 --trainer.strategy ddp`` (slow).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_corpus as cli_write_corpus  # the shared tiny WikiText-2 generator

ROOT = Path(__file__).resolve().parents[1]
B, T, W = 4, 8, 2  # global streams, segment length, world size


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_corpus(root: Path, seed: int = 0) -> Path:
    return cli_write_corpus(root, seed, lines=(60, 12, 12), max_len=12)  # test_cli's generator


def run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)
    env.pop("WORLD_SIZE", None)
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)} failed (rc {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


# ------------------------------------------------------------------------------------------------
# worker (this file as a script)
# ------------------------------------------------------------------------------------------------
def worker(out_dir: str, data_root: str) -> None:
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback

    from lm.config import EvalConfig
    from lm.data.datamodule import LMDataModule
    from lm.tasks.lm_module import LanguageModel

    class Record(Callback):
        def __init__(self):
            self.rows, self.batch = [], None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.batch = batch
            mem = pl_module.mems
            self.rows.append({"epoch": trainer.current_epoch, "batch": batch_idx, "first": bool(batch["first"]),
                              "input": batch["input"].tolist(),
                              "mem_rows_before": None if mem is None else int(mem[0].size(0))})

        def on_before_backward(self, trainer, pl_module, loss):
            # After the forward, before the update: layer 0's memory must be this rank's own segment
            # (dropout 0, relative positions: layer-0 input = embedding of the input tokens).
            with torch.no_grad():
                own = pl_module.net.embed(self.batch["input"])
            mem = pl_module.mems[0]
            self.rows[-1]["mem_is_own_segment"] = bool(mem.shape == own.shape and torch.allclose(mem, own))

    L.seed_everything(1234)
    ev = EvalConfig(protocol="memory", batch_size=2)
    dm = LMDataModule(corpus="wikitext-2", root=data_root, batch_size=B, tgt_len=T, eval=ev,
                      cache_dir=os.path.join(out_dir, "cache"))
    model = LanguageModel(vocab_size=dm.vocab_size, unit=dm.unit, tgt_len=T, n_layer=2, d_model=16, n_head=2,
                          d_head=8, d_inner=32, dropout=0.0, pos="relative", mem_len=T, adaptive=False, eval=ev)
    rec = Record()
    trainer = L.Trainer(accelerator="cpu", devices=W, strategy="ddp", max_epochs=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, num_sanity_val_steps=0, callbacks=[rec],
                        default_root_dir=out_dir)
    trainer.fit(model, datamodule=dm)
    rank = trainer.global_rank
    checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    dump = {"rank": rank, "world_size": trainer.world_size, "rows": rec.rows, "checksum": checksum,
            "val": getattr(model, "last_result", None), "steps": trainer.global_step}
    if rank == 0:
        dump["train_tokens"] = dm.tokens("train").tolist()
        dump["valid_tokens"] = int(dm.tokens("valid").numel())
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(dump))


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    data = write_corpus(tmp / "data")
    out = tmp / "out"
    out.mkdir()
    run([sys.executable, str(Path(__file__).resolve()), str(out), str(data)], cwd=tmp)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(W)]


def test_ddp_two_processes_finish_and_sync(ddp_run):
    r0, r1 = ddp_run
    assert (r0["world_size"], r1["world_size"]) == (W, W)
    assert r0["steps"] == r1["steps"] > 0
    assert r0["checksum"] == pytest.approx(r1["checksum"], rel=1e-6, abs=1e-6)  # gradients were all-reduced
    # Validation (memory protocol, streams split across ranks): the metric is synchronised, and the
    # union of the ranks scored every target of the split (token 0 has no context) exactly once.
    assert r0["val"]["nll"] == pytest.approx(r1["val"]["nll"], rel=1e-6)
    assert r0["val"]["tokens_scored"] == r1["val"]["tokens_scored"] == r0["valid_tokens"] - 1


def test_ddp_every_stream_exactly_once_per_epoch(ddp_run):
    import torch

    from lm.data.streams import OrderedStreams

    tokens = torch.tensor(ddp_run[0]["train_tokens"])
    ref = OrderedStreams(tokens, B, T)  # one process, the global batches
    per = B // W
    for epoch in (0, 1):
        seen = {r["rank"]: [row for row in r["rows"] if row["epoch"] == epoch] for r in ddp_run}
        assert all(len(rows) == len(ref) for rows in seen.values()), {k: len(v) for k, v in seen.items()}
        all_rows = []
        for k in range(len(ref)):
            glob = ref.batch(k)["input"].tolist()
            for rank in range(W):
                rows = seen[rank][k]["input"]
                assert seen[rank][k]["batch"] == k
                assert rows == glob[rank * per:(rank + 1) * per], f"epoch {epoch} batch {k} rank {rank}"
            union = seen[0][k]["input"] + seen[1][k]["input"]
            assert sorted(union) == sorted(glob)
            all_rows += [tuple(x) for x in union]
        # every (stream, segment) once: B * n_batches distinct rows of text in the epoch
        assert len(all_rows) == B * len(ref)
        firsts = sorted(tuple(seen[rank][0]["input"][i]) for rank in range(W) for i in range(per))
        assert firsts == sorted(tuple(x) for x in ref.batch(0)["input"].tolist())


def test_ddp_memory_is_per_rank(ddp_run):
    for r in ddp_run:
        for row in r["rows"]:
            assert row["first"] == (row["batch"] == 0)
            # reset on the first batch of every epoch, B/W rows (this rank's streams) otherwise
            assert row["mem_rows_before"] == (None if row["first"] else B // W), row
            assert row["mem_is_own_segment"], row


@pytest.mark.slow
def test_lm_cli_fit_ddp(tmp_path):
    data = write_corpus(tmp_path / "data")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"""
seed_everything: 7
trainer:
  default_root_dir: {tmp_path / 'run'}
  accelerator: cpu
  devices: 2
  strategy: ddp
  max_steps: 6
  val_check_interval: 3
  limit_val_batches: 2
  log_every_n_steps: 1
  enable_progress_bar: false
model:
  n_layer: 2
  d_model: 16
  n_head: 2
  d_head: 8
  d_inner: 32
  pos: relative
  mem_len: 8
  adaptive: false
  optim:
    warmup_steps: 1
data:
  corpus: wikitext-2
  root: {data}
  cache_dir: {tmp_path / 'cache'}
  batch_size: 4
  tgt_len: 8
  eval:
    protocol: memory
    batch_size: 2
""")
    run([sys.executable, "-m", "lm.cli", "fit", "--config", str(cfg)], cwd=tmp_path, timeout=400)
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
