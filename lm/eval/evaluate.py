"""``lm evaluate``: clean vs contaminated evaluation of one or more checkpoints, one protocol.

For every checkpoint the clean split and each requested corruption (``word_swap:0.015``, ...) are
scored by the same ``LanguageModel.test`` code path as ``lm test``; the table (markdown + JSON +
TensorBoard) gives PPL (or BPC) clean vs contaminated and the degradation ratio.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from lm import checkpoint
from lm.config import EvalConfig
from lm.errors import ConfigError, StopRequested
from lm.tasks.pretrained import load_language_model
from lm.utils import RunLock, atomic_write_text, check_writable_dir


def evaluate(
    ckpts: str | list[str],
    corruptions: str = "word_swap:0.015",
    split: str = "test",
    corpus: str | None = None,
    root: str | None = None,
    source: str = "auto",
    base_url: str | None = None,
    protocol: str = "segments",
    tgt_len: int | None = None,
    mem_len: int | None = None,
    clamp_len: int | None = None,
    stride: int | None = None,
    batch_size: int = 10,
    seed: int = 0,
    out: str | None = None,
    accelerator: str = "auto",
    precision: str = "auto",
    limit_batches: int | float = 1.0,
) -> dict:
    """Evaluate checkpoints on a clean split and on each corruption of it, under one protocol.

    Args:
        ckpts: checkpoint files written by ``lm fit``, comma-separated or a list (their vocabulary
            travels inside the checkpoint).
        corruptions: comma-separated ``recipe:rate[:sampling]`` specs, e.g.
            ``word_swap:0.015,char_swap:0.015``; the sampling is ``textattack`` (default, the paper's
            TextAttack draw) or ``exact`` (``word_swap:0.015:exact``, min(n, eligible) swaps per line);
            an empty string evaluates the clean split only.
        split: ``test`` or ``valid``.
        corpus: corpus name; default: the one each checkpoint was trained on.
        root: data directory (see ``data.root``).
        source: ``auto`` (local files, else download them once), ``local`` or ``download`` (``data.source``).
        base_url: where EnWik8's zip is downloaded from (``data.base_url``).
        protocol: ``segments``, ``memory`` or ``sliding`` (docs/methods.md, "Evaluation protocols"), or
            ``full_eval``: the MoE authors' column/whole-block protocol, which scores about 90% of the split (its
            fraction is in the table).
        tgt_len: evaluation window (default: the training segment length).
        mem_len: memory length for the ``memory`` protocol (default: the model's).
        clamp_len: relative-position clamp (default: the model's).
        stride: sliding-window stride.
        batch_size: evaluation batch size.
        seed: corruption seed (recorded in the manifests).
        out: output folder for ``table.md``, ``results.json`` and TensorBoard events (default: ``<run dir>/evaluate``
            for one checkpoint, ``results/evaluate-<date>-<time>`` for several: never a fixed folder that a later
            evaluation would overwrite). ``results.json`` is rewritten after every finished checkpoint, and on a
            stop (``"complete": false``). One evaluation at a time writes to a folder (``<out>/.lock``).
        accelerator: Lightning accelerator.
        precision: ``auto`` (each checkpoint in the precision it was trained in; 32-true for a bf16 one where
            this machine has no fast bf16), or a Lightning precision for all: ``32-true``, ``bf16-mixed``.
        limit_batches: evaluate only this many (int) or this fraction (float) of batches (smoke tests); the
            result then records the limit and is never marked complete.
    """
    import lightning as L
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from corruptions.spec import parse_specs
    from lm import precision as lm_precision
    from lm.tasks.progress import LineProgress

    if isinstance(ckpts, str):
        ckpts = [c.strip() for c in ckpts.split(",") if c.strip()]
    ckpts = [str(checkpoint.local_path(c, "--ckpts")) for c in ckpts]  # file:// as its path; other URLs refused
    if not ckpts:
        raise ConfigError("--ckpts names no checkpoint. Give one or more .ckpt files written by `lm fit`, "
                          "comma-separated (e.g. --ckpts runs/a/checkpoints/last.ckpt,runs/b/checkpoints/last.ckpt).")
    if split not in ("test", "valid"):
        raise ConfigError(f"split must be 'test' or 'valid', got '{split}'.")
    specs = parse_specs(corruptions) if corruptions and corruptions.strip() else []
    ecfg = EvalConfig(protocol=protocol, tgt_len=tgt_len, mem_len=mem_len, clamp_len=clamp_len, stride=stride,
                      batch_size=batch_size)
    # Everything is checked before the first (long) evaluation: every checkpoint readable, the output folder
    # writable. A missing second checkpoint or an unusable --out used to surface only after the first ran.
    _check_limit(limit_batches)

    def make_trainer(root: str, prec: str):
        return L.Trainer(accelerator=accelerator, devices=1, precision=prec, logger=False,
                         enable_checkpointing=False, enable_progress_bar=sys.stderr.isatty(),
                         callbacks=[LineProgress(every_n_batches=100)], enable_model_summary=False,
                         limit_test_batches=limit_batches, limit_val_batches=limit_batches, default_root_dir=root)

    try:  # a Trainer writes nothing when built: bad settings are refused before any work, in one paragraph
        make_trainer(tempfile.gettempdir(), lm_precision.resolve(precision, accelerator)[0])
    except (ValueError, TypeError, RuntimeError, ImportError, MisconfigurationException) as e:
        raise ConfigError(f"Lightning rejected --accelerator {accelerator} / --precision {precision}: "
                          f"{' '.join(str(e).split())[:300]} Use --precision auto, 32-true, bf16-mixed or 16-mixed "
                          f"(see `lm evaluate --help`) and an accelerator this machine has (cpu, gpu, auto).") from None
    for c in ckpts:  # one model in memory at a time, here and in the loop below
        _check_windows(_check_checkpoint(c), ecfg, accelerator)
    out_dir = Path(out) if out else default_out(ckpts)
    check_writable_dir(out_dir, "--out", "results/evaluate")
    rows, row, step = [], None, 0
    # One evaluation per --out at a time (a second would replace the first's results.json); the per-checkpoint
    # tokenizers and Lightning folders are scratch, removed on every exit (a stop signal included).
    with RunLock(out_dir, "lm evaluate", "write to another folder with --out"), \
            tempfile.TemporaryDirectory(prefix="lm-eval-", ignore_cleanup_errors=True) as scratch:
        try:
            for ckpt_path in ckpts:
                row = {"checkpoint": ckpt_path, "name": _run_name(ckpt_path), "results": {}}
                trained = lm_precision.trained_precision(checkpoint.read(ckpt_path), ckpt_path)
                prec, why = lm_precision.resolve(precision, accelerator, trained)
                if lm_precision.canonical(precision) == lm_precision.AUTO:
                    print(f"lm evaluate: {row['name']}: precision auto -> {prec} ({why})", file=sys.stderr,
                          flush=True)
                for label, n_variants, model, dm, extra in _variants(ckpt_path, row, specs, split, seed, corpus, root,
                                                                      source, base_url, ecfg, Path(scratch)):
                    step += 1
                    print(f"lm evaluate [{step}/{len(ckpts) * n_variants}] {row['name']}: {label}", file=sys.stderr,
                          flush=True)
                    trainer = make_trainer(str(Path(scratch) / row["name"]), prec)
                    (trainer.test if split == "test" else trainer.validate)(model, datamodule=dm, verbose=False)
                    if trainer.received_sigterm:  # Lightning lets a stop in the last batch pass: it is one
                        raise SIGTERMException()
                    row["results"][label] = {**model.last_result, **extra, "checkpoint": ckpt_path}
                clean = row["results"]["clean"][row["results"]["clean"]["metric"]]
                for r in row["results"].values():
                    r["ratio_vs_clean"] = r[r["metric"]] / clean if clean else None
                rows.append(row)
                row = None
                report = _report(rows, ecfg, split, seed, done=len(rows) == len(ckpts))
                atomic_write_text(out_dir / "results.json", json.dumps(report, indent=2, default=str))  # rows kept
        except (SIGTERMException, StopRequested):
            # What was scored before the stop is kept, marked incomplete: never a file that looks finished.
            partial = rows + ([row] if row and row["results"] else [])
            report = _report(partial, ecfg, split, seed, done=False)
            report["incomplete"] = "stopped by a signal (SIGTERM or Ctrl-C)"
            atomic_write_text(out_dir / "results.json", json.dumps(report, indent=2, default=str))
            raise
    table = markdown_table(report)
    atomic_write_text(out_dir / "table.md", table)
    _tensorboard(out_dir, report, table)
    print(table)
    print(f"\nwritten: {out_dir / 'table.md'}, {out_dir / 'results.json'}")
    return report


def _variants(ckpt_path, row, specs, split, seed, corpus, root, source, base_url, ecfg, tmp: Path):
    """``(label, number of variants, model, data module, corruption record)`` for the clean split and each
    corruption of it; fills ``row``'s description of the model."""
    from corruptions.manifest import corrupt_file
    from lm.data.datamodule import LMDataModule

    name = row["name"]
    model, vocab, ckpt = load_language_model(ckpt_path, eval=ecfg, results_dir=str(tmp / name))
    hp, data_hp = ckpt.get("hyper_parameters", {}), ckpt.get("lm_data", {})
    row.update({"attention": hp.get("attention"), "ffn": hp.get("ffn"), "unit": vocab.unit})
    tok_path = tmp / f"{name}-tokenizer.json"
    vocab.save(tok_path)
    dm_kwargs = dict(corpus=corpus or data_hp.get("corpus", "wikitext-2"), root=root, source=source,
                     base_url=base_url, tokenizer=str(tok_path), tgt_len=hp.get("tgt_len", 128), batch_size=1,
                     eval=ecfg)
    clean_file = LMDataModule(**dm_kwargs).split_file(split)
    variants = [("clean", None, None)]
    for spec in specs:
        res = corrupt_file(clean_file, **spec.kwargs(), seed=seed,
                           format="enwik8" if vocab.unit == "byte" else "wikitext")
        variants.append((spec.label, res.path, res.manifest))
    for label, path, manifest in variants:
        kw, extra = dict(dm_kwargs), {}
        if path is not None:
            kw[f"{split}_file"] = str(path)
            extra = {"corruption": {k: manifest.get(k) for k in (
                "recipe", "rate", "seed", "replacement", "sampling", "effective_rate", "swapped_line_fraction",
                "token_change_rate", "unk_swaps", "n_swaps", "source_sha256", "output_sha256")},
                "corrupted_file": str(Path(path).resolve())}
        yield label, len(variants), model, LMDataModule(**kw), extra


def _check_limit(limit) -> None:
    whole = isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1
    if not (whole or isinstance(limit, float) and 0 < limit <= 1):
        raise ConfigError(
            f"--limit_batches {limit!r} scores nothing or is not a batch count: give a whole number of batches "
            f"(20) or a fraction of the split in (0, 1] (0.25; 1.0, the default, scores all of it). A limited "
            f"evaluation is recorded with its limit and \"complete\": false.")


def _report(rows: list[dict], ecfg: EvalConfig, split: str, seed: int, done: bool) -> dict:
    """``complete``: every checkpoint done and every variant scored in full (no --limit_batches, no stop)."""
    scored = [r for row in rows for r in row["results"].values() if "complete" in r]
    first = next(iter(scored), {})
    return {"protocol": first.get("protocol", asdict(ecfg)), "split": split, "corruption_seed": seed,
            "precision": first.get("precision"), "limit_batches": first.get("limit_batches"),
            "tokens_scored": sum(r.get("tokens_scored", 0) for r in scored),
            "complete": done and all(r["complete"] for r in scored), "rows": rows}


def _check_checkpoint(path: str):
    """Readable, an LM checkpoint with its vocabulary, and its weights fit its architecture (a full load:
    shape mismatches show now, not after the first checkpoints' evaluations)."""
    from lm.tasks.lm_module import LanguageModel

    checkpoint.check_model_class(checkpoint.read(path), path, LanguageModel)
    return load_language_model(path)[0]


def _check_windows(model, ecfg: EvalConfig, accelerator: str) -> None:
    """The window-memory guard of every command (``lm.data.window_memory``), before any data is read."""
    from lm.data.window_memory import check_windows, eval_window, resolve_device

    check_windows([eval_window("--tgt_len (default: the training segment length)", "--batch_size", ecfg, model.cfg,
                               model.tgt_len)], model.cfg.n_head, resolve_device(accelerator))


def default_out(ckpts: list[str]) -> Path:
    """``<run dir>/evaluate`` for one checkpoint of a run folder, else a new timestamped folder."""
    p = Path(ckpts[0]).resolve()
    if len(ckpts) == 1 and p.parent.name == "checkpoints":
        return p.parent.parent / "evaluate"
    return Path("results") / time.strftime("evaluate-%Y%m%d-%H%M%S")


def markdown_table(report: dict) -> str:
    rows = report["rows"]
    if not rows:
        return "(no checkpoints)"
    labels = list(rows[0]["results"])
    metric = rows[0]["results"]["clean"]["metric"].upper()
    head = ["model"] + [f"{metric} {lab}" for lab in labels] + [f"x {lab}" for lab in labels[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        res = row["results"]
        vals = [f"{res[lab][res[lab]['metric']]:.3f}" for lab in labels]
        ratios = [f"{res[lab]['ratio_vs_clean']:.3f}" for lab in labels[1:]]
        lines.append("| " + " | ".join([row["name"]] + vals + ratios) + " |")
    p = report["protocol"]
    lines.append("")
    lines.append(f"Protocol: {p.get('protocol')}, window {p.get('window')}, stride {p.get('stride')}, "
                 f"memory {p.get('mem_len')}, batch {p.get('batch_size')}, normalised per {p.get('normalised_by')}; "
                 f"split {report['split']}; tokens scored {rows[0]['results']['clean']['tokens_scored']}"
                 f"{_fraction(rows[0]['results']['clean'])}; "
                 f"corruption seed {report['corruption_seed']}. 'x' = contaminated / clean.")
    if not report.get("complete"):
        why = sorted({r.get("incomplete", "") for row in rows for r in row["results"].values()} - {""})
        lines.append(f"INCOMPLETE: {'; '.join(why) or 'not every checkpoint was scored'}.")
    return "\n".join(lines) + "\n"


def _fraction(result: dict) -> str:
    """`` of N targets (F%)`` where a protocol does not score the whole split (full_eval), else nothing."""
    f, n = result.get("scored_fraction"), result.get("targets_in_split")
    return f" of {n} targets ({100 * f:.2f}%)" if f is not None and n and f < 1 else ""


def _run_name(ckpt_path: str) -> str:
    p = Path(ckpt_path).resolve()
    run = p.parent.parent.name if p.parent.name == "checkpoints" else p.parent.name
    return f"{run}/{p.stem}" if p.stem not in ("last",) else run


def _tensorboard(out_dir: Path, report: dict, table: str) -> None:
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(out_dir / "tb"))
    for row in report["rows"]:
        for label, r in row["results"].items():
            w.add_scalar(f"{row['name']}/{r['metric']}/{label}", r[r["metric"]])
    w.add_text("table", table)
    w.close()


def evaluate_cli(argv: list[str]) -> None:
    from jsonargparse import CLI

    CLI(evaluate, args=argv, as_positional=False, allow_abbrev=False)  # a typo is an error, not a prefix match
