"""The ``lm`` command.

    lm fit | validate | test   LightningCLI over LanguageModel + LMDataModule (one YAML per recipe)
    lm corrupt                 word-swap / char-swap a test split (corruptions package)
    lm evaluate                clean vs corrupted evaluation of one or more checkpoints
    lm finetune                SST-2 sequence classification from a pretrained checkpoint
    lm analyze                 representation collapse, head redundancy, attention entropy/maps
    lm generate / lm export    continue a prompt; write a checkpoint as safetensors + config + tokenizer
    lm summary                 a recipe's model layer by layer with parameter counts (lm/summary.py)

Config flows one way: YAML (omegaconf interpolation) -> jsonargparse -> typed signatures/dataclasses.
Errors caused by user input are printed as one paragraph, without a traceback, exit code 2: an
``LMError`` (also when jsonargparse or Lightning wrapped it in another exception), Lightning's own
``MisconfigurationException``, and a ``--ckpt_path`` that is missing, unreadable or of another model
class (checked before LightningCLI reads it). Anything else is a bug and keeps its traceback.

This module imports no Lightning (and no torch): the LightningCLI commands live in ``lm.lightning_cli``, imported
only by the commands that run a Trainer, so ``lm --help`` and ``lm corrupt`` start at once.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lm.errors import ConfigError, LMError

COMMANDS = {  # `lm --help`: every subcommand, one line each
    "fit": "train a language model from a YAML recipe (configs/...); resumable with --ckpt_path last",
    "validate": "evaluate a checkpoint on the validation split (--ckpt_path)",
    "test": "evaluate a checkpoint on the test split and write results/test-<protocol>.json",
    "corrupt": "write a word-swapped (or char-swapped) copy of a split, with a manifest",
    "evaluate": "clean vs word-swapped perplexity of one or more checkpoints, as a table",
    "finetune": "SST-2 sentiment classification from a pretrained checkpoint (fit / validate)",
    "analyze": "representation collapse, head redundancy and attention maps of a checkpoint",
    "generate": "continue a prompt with a checkpoint or an exported model",
    "export": "write a checkpoint as model.safetensors + config.json + tokenizer.json + model card",
    "summary": "a recipe's model layer by layer with parameter counts, without data (--vocab_size N)",
}
_CKPT = "runs/wikitext2-tiny-softmax/checkpoints/last.ckpt"
EXAMPLES = {  # `lm COMMAND --help`: one command that works as printed after the quickstart's first training
    "fit": "lm fit --config configs/wikitext2/tiny.yaml --config configs/wikitext2/variants/elliptical.yaml",
    "validate": f"lm validate --config configs/wikitext2/tiny.yaml --ckpt_path {_CKPT}",
    "test": f"lm test --config configs/wikitext2/tiny.yaml --ckpt_path {_CKPT}",
    "corrupt": "lm corrupt --corpus wikitext-2 --split test --rate 0.015",
    "evaluate": f"lm evaluate --ckpts {_CKPT} --corruptions word_swap:0.015,word_swap:0.025",
    "finetune": f"lm finetune fit --config configs/sst2/finetune.yaml --model.pretrained {_CKPT}",
    "analyze": f"lm analyze --ckpt {_CKPT} --split test --out results/analyze-softmax",
    "generate": f'lm generate --ckpt {_CKPT} --prompt "The cat" --max_new_tokens 30',
    "export": f"lm export --ckpt {_CKPT} --out exported/tiny-softmax",
    "summary": "lm summary --config configs/wikitext103/small.yaml --vocab_size 267735",
}
# The Lightning commands list hundreds of options; these are the ones a user starts with.
MAIN_OPTIONS = {
    "fit": "--config RECIPE.yaml (repeat it for overlays), --trainer.max_steps N, --trainer.precision auto|32-true|"
           "bf16-mixed, --trainer.default_root_dir runs/NAME, --ckpt_path last (resume), --print_config",
    "validate": "--config RECIPE.yaml, --ckpt_path CKPT (default: the run's last.ckpt), --trainer.limit_val_batches N, "
                "--data.eval.protocol segments|memory|sliding",
    "test": "--config RECIPE.yaml, --ckpt_path CKPT (default: the run's last.ckpt), --trainer.limit_test_batches N, "
            "--data.eval.protocol segments|memory|sliding",
    "finetune": "fit | validate, --config configs/sst2/finetune.yaml, --model.pretrained CKPT (fit), --ckpt_path CKPT "
                "(validate), --trainer.default_root_dir runs/NAME; `lm finetune fit --help` lists them all",
}
# Third-party messages that carry no information for a user of `lm` and bury its output; silenced
# here (the CLI), one exact message each, never in the library or the tests.
HARMLESS_WARNINGS = (
    r"LightningCLI's args parameter is intended to run from within Python",  # lm passes argv on purpose
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning vs newer torch pytree
    # the model summary's size estimate in MB under bf16 (it counts 32 bits); `precision: auto` picks bf16 often
    r"Precision bf16-mixed is not supported by the model summary",
)
HARMLESS_LOG_PREFIXES = ("💡 Tip: For seamless cloud",)  # Lightning's advertisement for its logger / registry


def user_error(exc: BaseException) -> Exception | None:
    """The user-input error behind ``exc``: an ``LMError`` anywhere in its cause/context chain (jsonargparse
    wraps a dataclass's ConfigError in a ValueError about Union subtypes), or Lightning's own
    ``MisconfigurationException``; None for anything else (a bug: keep the traceback)."""
    from lm.rundir import write_error

    seen, e = set(), exc
    while e is not None and id(e) not in seen:
        if isinstance(e, LMError):
            return e
        if isinstance(e, OSError) and (w := write_error(e)) is not None:  # full disk, read-only, a file in the way
            return w
        if isinstance(e, ValueError) and "`val_check_interval`" in str(e):  # raised by Lightning at fit start
            return ConfigError(
                f"{' '.join(str(e).split())} In `lm`, an integer --trainer.val_check_interval counts training steps "
                f"across epochs unless --trainer.check_val_every_n_epoch is set: drop that option (or set it to "
                f"null), or give a smaller interval or a fraction of an epoch (0.5).")
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return exc if _is_lightning(exc, "lightning.fabric.utilities.exceptions", "MisconfigurationException") else None


def _is_lightning(exc: BaseException, module: str, name: str) -> bool:
    """``isinstance(exc, module.name)`` without importing Lightning: if its module was never imported,
    Lightning cannot have raised it."""
    mod = sys.modules.get(module)
    return mod is not None and isinstance(exc, getattr(mod, name))


def __getattr__(name: str):
    # The LightningCLI entry points, as ``lm.cli`` attributes without importing Lightning up front.
    if name in ("LMCLI", "FinetuneCLI", "lm_cli", "finetune_cli", "CheckedCkptPathMixin", "check_ckpt_path",
                "parser_kwargs", "LIGHTNING_SUBCOMMANDS"):
        from lm import lightning_cli

        return getattr(lightning_cli, name)
    raise AttributeError(f"module 'lm.cli' has no attribute {name!r}")


def corpus_split_file(corpus: str, split: str, root: str | None, source: str, base_url: str | None) -> Path:
    """``lm corrupt --corpus``: the split's file, found (or downloaded) as ``lm fit`` finds it."""
    from lm.data.datamodule import LMDataModule

    return LMDataModule(corpus=corpus, root=root, source=source, base_url=base_url).split_file(split)


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  lm {c:<{width}}  {h}" for c, h in COMMANDS.items()]
    return ("usage: lm COMMAND [options]   (lm COMMAND --help for its options and an example)\n\n"
            "Transformer-XL-style language models with Elliptical and other attention variants.\n\n"
            "commands:\n" + "\n".join(lines) + f"\n\nexample: {EXAMPLES['fit']}\n")


def unknown_command(cmd: str) -> str:
    import difflib

    close = difflib.get_close_matches(cmd, COMMANDS, n=1)
    hint = f" Did you mean `lm {close[0]}`?" if close else ""
    return f"lm: error: unknown command '{cmd}'.{hint} The commands: {', '.join(COMMANDS)} (`lm --help` says what each does)."


def command_help(cmd: str, text: str) -> str:
    """``lm COMMAND --help``: the command's name, purpose, main options and example above the option list its parser
    printed, which gets the command into its usage line, and plain backticks for the docstrings' reST markup."""
    import re
    import textwrap

    usage_block, sep, rest = text.partition("\n\n")
    if f" {cmd} " not in usage_block.splitlines()[0] + " ":  # fit/validate/test/finetune name it; the others do not
        m = re.match(r"usage: (\S+) ", usage_block)  # prog: the script's name (`lm` from the console)
        if m:
            shift = len(f"lm {cmd}") - len(m.group(1))
            usage_block = f"usage: lm {cmd} " + usage_block[m.end():]
            usage_block = re.sub(r"\n +", lambda w: w.group(0) + " " * shift if shift > 0 else w.group(0), usage_block)
    text = usage_block + sep + rest
    text = text.replace("``", "`")
    # Sphinx roles in Lightning's option docs (`:paramref:`~a.b.c``), also where the help wrapped a line after one
    text = re.sub(r":(?:class|func|meth|paramref|attr|mod|obj|ref):(\s*)`~?", lambda m: m.group(1) + "`", text)
    head = [f"lm {cmd}: {COMMANDS[cmd]}", "", "example:", f"  {EXAMPLES[cmd]}", ""]
    if cmd in MAIN_OPTIONS:
        head[2:2] = ["main options:", textwrap.fill(MAIN_OPTIONS[cmd], 100, initial_indent="  ", subsequent_indent="  "),
                     ""]
    return "\n".join(head) + "\n" + text


def quiet_harmless_warnings() -> None:
    import logging
    import warnings

    for pattern in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)

    def not_a_tip(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(HARMLESS_LOG_PREFIXES)

    for name in ("lightning.fabric.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).addFilter(not_a_tip)


def main(argv: list[str] | None = None) -> int:
    from lm.rundir import StopRequested, StopSignals

    from_console = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = argv[0] if argv else None
    if cmd in (None, "-h", "--help", "help"):
        print(usage(), end="")
        return 0 if cmd else 2
    if cmd not in COMMANDS and not cmd.startswith("-"):  # (options first: LightningCLI's `lm --config X fit`)
        print(unknown_command(cmd), file=sys.stderr)
        return 2
    if from_console:
        quiet_harmless_warnings()
    if cmd in COMMANDS and any(a in ("-h", "--help") for a in argv[1:]):
        return _help(cmd, argv, from_console)
    with StopSignals() as stop:
        try:
            code = _dispatch(cmd, argv, from_console)
        except StopRequested as exc:  # a SIGTERM outside a Trainer
            return _stopped(stop, exc)
        except KeyboardInterrupt:
            print("lm: interrupted (Ctrl-C). Checkpoints and results are written atomically: the last saved "
                  "ones are intact; a fit resumes with --ckpt_path last.", file=sys.stderr)
            return 128 + 2
        except SystemExit as exc:
            if _is_lightning(exc, "lightning.pytorch.utilities.exceptions", "SIGTERMException"):
                # Lightning stopped at a batch boundary (SIGTERM, or the first Ctrl-C routed to it). Its exception
                # is a SystemExit without a code, i.e. exit 0: a scheduler would take the run for finished.
                return _stopped(stop, exc)
            if stop.received is not None and not exc.code:  # Lightning's own Ctrl-C path exits 0 or 1
                return stop.exit_code()
            raise
        if stop.received is not None:  # a stop Lightning let pass (an evaluation's last batch): never exit 0
            print(f"lm: stopped by {stop.name()} as the command ended. Results written under it say "
                  f"\"complete\": false.", file=sys.stderr)
            return stop.exit_code()
        return code


def _stopped(stop, exc: BaseException) -> int:
    notes = " ".join(getattr(exc, "__notes__", [])) or "Nothing was written at the stop."
    print(f"lm: stopped by {stop.name()}. {notes}", file=sys.stderr)
    return stop.exit_code()


def _help(cmd: str, argv: list[str], from_console: bool) -> int:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            code = _dispatch(cmd, argv, from_console)
        except SystemExit as exc:  # argparse exits after printing the help
            code = exc.code
    print(command_help(cmd, out.getvalue()), end="")
    return code or 0


def _dispatch(cmd: str | None, argv: list[str], from_console: bool) -> int:
    try:
        if cmd == "corrupt":
            from corruptions.cli import corrupt_cli

            # the source positionally (as in the README), with --src, or --corpus/--split found like lm fit
            corrupt_cli(argv[1:], resolve_corpus=corpus_split_file)
        elif cmd == "evaluate":
            from lm.eval.evaluate import evaluate_cli

            evaluate_cli(argv[1:])
        elif cmd == "finetune":
            from lm.lightning_cli import finetune_cli

            finetune_cli(argv[1:])
        elif cmd == "analyze":
            from lm.analysis.cli import analyze_cli

            analyze_cli(argv[1:])
        elif cmd == "summary":
            from lm.summary import summary_cli

            summary_cli(argv[1:])
        elif cmd == "generate":
            from lm.generate import generate_cli

            generate_cli(argv[1:])
        elif cmd == "export":
            from lm.export import export_cli

            export_cli(argv[1:])
        else:
            from lm.lightning_cli import lm_cli

            lm_cli(None if from_console else argv)
    except Exception as exc:
        e = user_error(exc)
        if e is None:
            raise
        print(f"lm: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
