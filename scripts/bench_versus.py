"""``scripts/bench.py --versus``: the framework against the plain-PyTorch reference and against itself
before issue 32's CPU-step changes, on the quickstart recipe, all three in ONE process.

    python scripts/bench.py --versus                         # WikiText-2, tiny recipe, fp32, 300 steps each
    python scripts/bench.py --versus --steps 2000 --target-ppl 250 --out results/bench_versus_2000.json

Contenders, from identical initial weights, on the same batches in the same order (the recipe's
``configs/wikitext2/tiny.yaml`` shape, dropout and learning-rate schedule; the tiny softmax model):

- ``reference``: ``scripts/reference_decoder.py`` in its plain loop (``nn.Dropout``, the per-parameter Adam);
- ``before``: the framework's ``TransformerLM`` with the code paths of before issue 32 switched back on
  (``nn.Dropout`` instead of ``lm.model.dropout.Dropout``, the dense FFN's in-place ReLU, Adam without
  its fused kernel);
- ``after``: the framework as it is (the optimizer from ``LanguageModel.configure_optimizers``).

All three run the same plain step (forward, adaptive-softmax NLL, backward, clip 0.25, Adam, schedule);
Lightning's own overhead is what ``scripts/bench.py``'s default mode measures. They take turns in chunks
of ``--chunk`` steps, the order rotating every round, so that load from other jobs on a shared machine
hits them alike; each keeps its own torch RNG state across turns, so its run does not depend on the
interleaving. Every ``--eval-every`` steps each is scored on the first ``--val-batches`` validation
batches (not timed). Reported per contender: training tokens/s (tokens over the summed step times), the
validation PPL curve, and the training time until the validation PPL first reaches ``--target-ppl``
(default: the lowest PPL that all three reached); then the ratios, and the load average at every round.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from pathlib import Path

import torch
import yaml

import benchlib as bl
import reference_decoder as refdec

from lm.config import OptimConfig
from lm.tasks.lm_module import LanguageModel

CONTENDERS = ("reference", "before", "after")


class _Trainer:
    """What ``LanguageModel.configure_optimizers`` reads of a Lightning trainer (float32: 32-true)."""

    def __init__(self, total: int):
        from lightning.pytorch.plugins.precision import Precision

        self.estimated_stepping_batches = total
        self.precision_plugin = Precision()  # 32-true


def framework(shape: dict, total: int, seed: int) -> LanguageModel:
    torch.manual_seed(seed)
    keys = ("n_layer", "d_model", "n_head", "d_head", "d_inner")
    lm = LanguageModel(vocab_size=shape["vocab"], tgt_len=shape["tgt_len"], **{k: shape[k] for k in keys},
                       dropout=shape["dropout"], cutoffs=list(shape["cutoffs"]),
                       attention=bl.attention_config("softmax"), optim=OptimConfig(**shape["optim"]))
    lm._trainer = _Trainer(total)
    return lm


def old_code_paths(net: torch.nn.Module) -> None:
    """Switch a framework model back to the code paths of before issue 32 (bench_versus ``before``,
    profile_step ``--code before``): torch's dropout mask, and the in-place ReLU of the dense FFN. (The
    other half, Adam without its fused kernel, is the caller's optimizer.)"""
    for m in net.modules():
        if isinstance(m, torch.nn.Dropout):  # lm.model.dropout.Dropout subclasses it
            m.__class__ = torch.nn.Dropout
        elif isinstance(m, torch.nn.ReLU):
            m.inplace = True


def contenders(shape: dict, total: int, seed: int) -> dict:
    """name -> (module, step(batch) -> None, nll_sum(batch) -> (sum, count))."""
    out = {}
    for name in ("before", "after"):
        lm = framework(shape, total, seed)
        cfg = lm.configure_optimizers()
        opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
        if name == "before":
            old_code_paths(lm.net)
            opt = torch.optim.Adam(lm.parameters(), **{**opt.defaults, "fused": None})
            sched = torch.optim.lr_scheduler.LambdaLR(opt, sched.lr_lambdas[0])
        out[name] = (lm.net, _step(lm.net, opt, sched, lambda net, b: net.nll(net(b["input"]).hidden,
                                                                                 b["target"]).mean()),
                     lambda b, net=lm.net: _nll(net.nll(net(b["input"]).hidden, b["target"])))
    state = out["after"][0].state_dict()
    ref = refdec.ReferenceDecoder(shape["vocab"], shape["n_layer"], shape["d_model"], shape["n_head"], shape["d_head"],
                                  shape["d_inner"], list(shape["cutoffs"]), dropout=shape["dropout"])
    ref.load_state_dict(copy.deepcopy(state), strict=True)  # names mirror TransformerLM's
    o = shape["optim"]
    opt = torch.optim.Adam(ref.parameters(), lr=o["lr"])
    sched = refdec.warmup_cosine(opt, o["warmup_steps"], total)
    out["reference"] = (ref, _step(ref, opt, sched, lambda net, b: net(b["input"], b["target"])[0]),
                        lambda b: _nll_ref(ref, b))
    return out


def _step(net, opt, sched, loss_fn):
    def step(batch):
        loss = loss_fn(net, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 0.25)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    return step


def _nll(nll: torch.Tensor) -> tuple[float, int]:
    return float(nll.sum()), nll.numel()


def _nll_ref(ref, batch) -> tuple[float, int]:
    n = batch["target"].numel()
    return float(ref(batch["input"], batch["target"])[0]) * n, n


def data(a, shape: dict):
    """(train batches, validation batches): WikiText-2 through the framework's data module, or Zipf draws."""
    if a.versus_data == "synthetic":
        train = bl.streams(shape, a.steps, a.seed)
        val = list(bl.streams(shape, a.val_batches, a.seed + 2))
        return train, val
    from lm.data.datamodule import LMDataModule

    dm = LMDataModule(corpus="wikitext-2", batch_size=shape["batch"], tgt_len=shape["tgt_len"])
    dm.prepare_data()
    dm.setup("fit")
    shape["vocab"] = dm.vocab_size
    val = [b for b in dm.val_dataloader() if b.get("mask") is None or bool(b["mask"].all())][: a.val_batches]
    return dm.train_dataloader(), val


def recipe() -> dict:
    """The quickstart recipe's shape plus what training needs of it: dropout, optimizer, max_steps."""
    r = yaml.safe_load(bl.TINY_RECIPE.read_text())
    return dict(bl.SHAPES["tiny"], dropout=r["model"]["dropout"], optim=dict(r["model"]["optim"]),
                max_steps=r["trainer"]["max_steps"])


def run(a) -> dict:
    shape = recipe()
    if a.smoke:  # every code path in seconds; the numbers mean nothing
        shape.update(n_layer=2, d_model=32, n_head=2, d_head=16, d_inner=64, batch=2, tgt_len=16,
                     vocab=500, cutoffs=[100, 300])
    train, val = data(a, shape)
    total = shape["max_steps"]
    runs = contenders(shape, total, a.seed)
    rng = {k: torch.get_rng_state() for k in runs}
    res = {k: {"step_s": [], "ppl": [], "round_s": []} for k in runs}
    batches = iter(train)
    tokens = shape["batch"] * shape["tgt_len"]
    rounds, done, loads = 0, 0, []
    while done < a.steps:
        chunk = [next(batches) for _ in range(min(a.chunk, a.steps - done))]
        order = list(CONTENDERS[rounds % 3:] + CONTENDERS[: rounds % 3])
        loads.append(bl.loadavg())
        for name in order:
            net, step, _ = runs[name]
            net.train()
            torch.set_rng_state(rng[name])
            for b in chunk:
                t0 = time.perf_counter()
                step(b)
                res[name]["step_s"].append(time.perf_counter() - t0)
            res[name]["round_s"].append(sum(res[name]["step_s"][-len(chunk):]))
            rng[name] = torch.get_rng_state()
        done += len(chunk)
        rounds += 1
        if done % a.eval_every == 0 or done == a.steps:
            for name, (net, _, nll) in runs.items():
                net.eval()
                with torch.no_grad():
                    s, n = map(sum, zip(*(nll(b) for b in val)))
                res[name]["ppl"].append((done, round(math.exp(s / n), 3)))
    return summarize(a, shape, res, tokens, loads)


def summarize(a, shape: dict, res: dict, tokens: int, loads: list) -> dict:
    target = a.target_ppl or max(min(p for _, p in r["ppl"]) for r in res.values())
    rows = {}
    for name in CONTENDERS:
        r = res[name]
        cum = [0.0]
        for s in r["step_s"]:
            cum.append(cum[-1] + s)
        reach = next((step for step, p in r["ppl"] if p <= target), None)
        rows[name] = {"train_tokens_per_s": round(len(r["step_s"]) * tokens / cum[-1], 1),
                      "median_step_ms": round(sorted(r["step_s"])[len(r["step_s"]) // 2] * 1e3, 1),
                      "val_ppl": r["ppl"], "steps_to_target": reach,
                      "train_s_to_target": round(cum[reach], 3) if reach is not None else None}

    def ratio(key, x, y, inverse=False):
        u, v = rows[x][key], rows[y][key]
        return None if u is None or v is None else round((v / u) if inverse else (u / v), 3)

    ratios = {}
    for x, y in (("after", "reference"), ("after", "before"), ("before", "reference")):
        # Paired per round (same batches, back to back): robust to load that drifts over the run.
        paired = sorted(b / a for a, b in zip(res[x]["round_s"], res[y]["round_s"]))
        q = lambda f: round(paired[min(len(paired) - 1, int(f * len(paired)))], 3)  # noqa: E731
        ratios[f"{x}_vs_{y}"] = {"tokens_per_s": ratio("train_tokens_per_s", x, y),
                                 "speed_to_target": ratio("train_s_to_target", x, y, inverse=True),
                                 "per_round_median": q(0.5), "per_round_quartiles": [q(0.25), q(0.75)]}
    return {"target_ppl": target, "target_from": "given" if a.target_ppl else "lowest PPL all reached",
            "steps": a.steps, "chunk": a.chunk, "eval_every": a.eval_every, "val_batches": a.val_batches,
            "data": a.versus_data, "shape": shape, "results": rows, "ratios": ratios, "loadavg_per_round": loads,
            "step_s": {k: [round(t, 4) for t in r["step_s"]] for k, r in res.items()}}


def markdown(r: dict) -> str:
    lines = [f"| contender | train tokens/s | median step ms | val PPL at the end | steps to PPL {r['target_ppl']:.1f} "
             "| train s to it |", "|---|---:|---:|---:|---:|---:|"]
    for name, row in r["results"].items():
        lines.append(f"| {name} | {row['train_tokens_per_s']:.0f} | {row['median_step_ms']:.0f} | "
                     f"{row['val_ppl'][-1][1]:.1f} | {row['steps_to_target']} | {row['train_s_to_target']} |")
    lines.append("")
    for k, v in r["ratios"].items():
        lines.append(f"- {k.replace('_vs_', ' / ')}: tokens/s ×{v['tokens_per_s']} (per round: median "
                     f"×{v['per_round_median']}, quartiles {v['per_round_quartiles']}), speed to the target PPL "
                     f"×{v['speed_to_target']}")
    return "\n".join(lines)


def main(a, threads_reason: str) -> int:
    """``scripts/bench.py --versus`` (``a``: its parsed arguments)."""
    if a.smoke:
        a.steps, a.chunk, a.eval_every, a.val_batches, a.versus_data = a.steps or 4, 2, 2, 2, "synthetic"
    a.steps = a.steps or 300
    load = bl.loadavg()
    r = run(a)
    report = {"schema": "bench_versus/1", "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "machine": {**bl.machine_info(), "loadavg_before": load, "loadavg_after": bl.loadavg()},
              "threads": torch.get_num_threads(), "threads_reason": threads_reason, **r}
    bl.write_json(a.out, report)
    print(markdown(r))
    print(f"\nload {load} -> {report['machine']['loadavg_after']}; wrote {a.out}")
    return 0
