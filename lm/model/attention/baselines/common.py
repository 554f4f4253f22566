"""Small helpers shared by the Table 1 baselines: the visibility mask and option checks."""

from __future__ import annotations

import torch
from torch import Tensor

from lm.errors import ConfigError
from lm.model.attention.base import AttnContext, causal


def visible(ctx: AttnContext, t: int, s: int, device) -> Tensor:
    """Bool ``[T, S]``, True where query i may see key j.

    ``ctx.mask`` when the decoder built one (memory: all M memory keys plus segment keys <= i),
    else plain causal attention over the segment (T == S)."""
    return ctx.mask if ctx.mask is not None else causal(t, s, device)


def require(ok: bool, variant: str, message: str) -> None:
    """Option validation: raise a ConfigError that names the variant."""
    if not ok:
        raise ConfigError(f"attention '{variant}': {message}")


def positive_int(variant: str, name: str, value, minimum: int = 1) -> None:
    require(isinstance(value, int) and not isinstance(value, bool) and value >= minimum, variant,
            f"option {name} must be an integer >= {minimum}, got {value!r}.")


def positive_float(variant: str, name: str, value) -> None:
    require(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0, variant,
            f"option {name} must be a number > 0, got {value!r}.")


def boolean(variant: str, name: str, value) -> None:
    require(isinstance(value, bool), variant, f"option {name} must be true or false, got {value!r}.")


def one_of(variant: str, name: str, value, choices: tuple[str, ...]) -> None:
    require(value in choices, variant, f"option {name} must be one of {', '.join(choices)}; got {value!r}.")


def masked_log(w: Tensor, allowed: Tensor) -> Tensor:
    """``log w`` where allowed, ``-inf`` elsewhere: key weights as an additive softmax bias.

    Zero weights are floored at 1e-30 (not -inf) so that the gradient stays finite when the weights
    are not detached; hidden keys get an exact -inf so causality does not rest on the floor."""
    return torch.where(allowed, w.clamp_min(1e-30).log(), torch.full_like(w, float("-inf")))


def at_least_float32(x: Tensor) -> Tensor:
    """Upcast half precision to float32 for exp/softmax work; float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
