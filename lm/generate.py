"""``lm generate``: continue a prompt with a checkpoint or an exported model, printing each token as it is
sampled (``Model.stream``), so even ``--max_new_tokens 1000000000`` shows text at once and holds only the context.
Its defaults are ``Model.generate``'s (one set, in lm/api.py)."""

from __future__ import annotations

import sys
from pathlib import Path

from lm.api import MAX_NEW_TOKENS, SEED, TEMPERATURE, TOP_K, TOP_P, check_sampling, check_text, load
from lm.errors import ConfigError


def generate(ckpt: str, prompt: str = "", prompt_file: str | None = None, max_new_tokens: int = MAX_NEW_TOKENS,
             temperature: float = TEMPERATURE, top_k: int | None = TOP_K, top_p: float | None = TOP_P,
             stop_at_eos: bool = False, num_samples: int = 1, seed: int = SEED, device: str = "cpu",
             cache: bool = True) -> None:
    """Continue a prompt with a trained model; prompt + continuation go to stdout as they are generated.

    Example: ``lm generate --ckpt exported/tiny --prompt "The cat" --max_new_tokens 30 --top_p 0.9``

    Args:
        ckpt: a checkpoint from ``lm fit``, a folder from ``lm export``, or hf://owner/name.
        prompt: the text to continue (word-level models: WikiText tokenisation, e.g. ``The cat @-@ like``).
        prompt_file: read the prompt from this UTF-8 file instead.
        max_new_tokens: tokens (words or bytes) to generate per sample.
        temperature: sampling temperature; 0 is greedy.
        top_k: sample among the k most likely tokens (0 or null: all).
        top_p: sample among the most likely tokens holding this probability (null or 1: all).
        stop_at_eos: end a sample at the end of its line (``<eos>``).
        num_samples: samples to draw, one after another from the seed.
        seed: sampling seed (the same seed gives the same text).
        device: cpu, cuda, cuda:1, ...
        cache: in the relative (Transformer-XL) setting, feed one token per step and reuse the memory.
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p, num_samples)
    if prompt_file is not None:
        if prompt:
            raise ConfigError("Pass --prompt or --prompt_file, not both.")
        try:
            prompt = check_text(Path(prompt_file).read_bytes(), f"--prompt_file {prompt_file}")
        except OSError as e:
            raise ConfigError(f"--prompt_file {prompt_file} is unreadable ({e.strerror}); pass an existing "
                              f"file.") from None
    model = load(ckpt, device)
    model.encode(check_text(prompt, "The prompt"))
    gen = model._generator(seed)
    for i in range(num_samples):
        if num_samples > 1:
            print(f"--- sample {i + 1} of {num_samples} ---")
        print(prompt, end="", flush=True)
        for piece in model.stream(prompt, max_new_tokens, temperature, top_k, top_p, seed, cache, stop_at_eos, gen):
            sys.stdout.write(piece)
            sys.stdout.flush()
        print()


def generate_cli(argv: list[str]) -> None:
    from jsonargparse import CLI

    CLI(generate, args=argv, as_positional=False, allow_abbrev=False)
