"""Attention variants side by side, behind one registry (``ATTENTION``, ``build_attention``).

Importing this package registers every variant."""

from lm.model.attention import elliptical, qknorm, quest, softmax  # noqa: F401  (registration)
from lm.model.attention import baselines  # noqa: F401  (registration: Table 1 baselines)
from lm.errors import ConfigError, unknown
from lm.model.attention.base import ATTENTION, Attention, AttnContext, LayerState, build_attention, register

__all__ = ["ATTENTION", "Attention", "AttnContext", "LayerState", "build_attention", "check_config", "register"]


def check_config(cfg) -> None:
    """Check a ``ModelConfig``'s attention against the registry: both variant names exist, the chosen
    variant accepts its options, and with ``pos: span`` every layer's variant can run on the span host. The
    model runs this before building any layer, so a typo fails with one message even where no layer selects
    the variant; the config itself cannot (it sits below the model and imports none of it: no
    config <-> model import cycle)."""
    attention = cfg.attention
    for name in {attention.name, attention.default}:
        if name not in ATTENTION:
            raise unknown("attention variant", name, ATTENTION)
    ATTENTION[attention.name].parse_options(attention.options)
    if cfg.pos == "span":
        for name in set(cfg.attention_layers()):
            if not ATTENTION[name].span_capable():
                ok = ", ".join(sorted(n for n, c in ATTENTION.items() if c.span_capable()))
                raise ConfigError(f"attention '{name}' has no key_pe position term, so it cannot run with "
                                  f"model.pos: span (the adaptive-span host). Choose a variant that supports it "
                                  f"({ok}) or model.pos: absolute.")
