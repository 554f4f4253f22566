"""Typed, validated configuration.

Config flows one way: YAML -> LightningCLI (jsonargparse, omegaconf interpolation) -> these
dataclasses -> modules. Every field uses Transformer-XL's vocabulary (d_model, n_head, d_head,
d_inner, tgt_len, mem_len, clamp_len). Validation happens in ``__post_init__`` so an invalid or
incompatible value fails when the config is built, with a message that names the fix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lm.errors import ConfigError, unknown

LayerSpec = str | int | list[int]
FFN_KINDS = ("moe", "dense", "none")  # ffn.layout entries: MoE, dense FFN, no FFN (attention only)
LAYOUTS = ("glam_authors", "glam_alternating", "all_moe")  # ffn.layout presets (FFNConfig.layer_kinds)


def select_layers(spec: LayerSpec | None, n_layer: int, what: str = "layers") -> list[int]:
    """Resolve a layer selection to sorted layer indices.

    ``spec`` is ``"all"``, ``"none"``, ``"even"``, ``"odd"``, a Python slice such as ``"1:"`` or
    ``"::2"``, or an explicit list of indices (negative indices count from the end).
    """
    if spec is None or spec == "all":
        return list(range(n_layer))
    if spec == "none":
        return []
    if isinstance(spec, int) and not isinstance(spec, bool):
        spec = [spec]
    if spec == "even":
        return list(range(0, n_layer, 2))
    if spec == "odd":
        return list(range(1, n_layer, 2))
    if isinstance(spec, str):
        parts = spec.split(":")
        if not 1 < len(parts) <= 3:
            raise ConfigError(
                f"{what}: '{spec}' is not a layer selection. Use 'all', 'none', 'even', 'odd', "
                f"a slice like '1:' or '::2', or a list of layer indices."
            )
        try:
            bounds = [int(p) if p.strip() else None for p in parts]
        except ValueError:
            raise ConfigError(f"{what}: slice '{spec}' must contain integers, e.g. '1:' or '0:8:2'.") from None
        try:
            return list(range(n_layer))[slice(*bounds)]
        except ValueError as e:  # e.g. a zero step
            raise ConfigError(f"{what}: slice '{spec}' is invalid ({e}).") from None
    out = []
    for i in spec:
        j = i + n_layer if i < 0 else i
        if not 0 <= j < n_layer:
            raise ConfigError(f"{what}: layer {i} does not exist in a {n_layer}-layer model (valid: 0..{n_layer - 1}).")
        out.append(j)
    return sorted(set(out))


def _check_choice(field_name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise unknown(field_name, value, choices)


@dataclass
class AttentionConfig:
    """Which attention variant runs on which layers.

    ``name`` runs on ``layers``; every other layer runs ``default``. ``options`` are the variant's own
    options (validated by the variant: an unknown option fails with the closest valid name).
    The paper's Elliptical model: ``name: elliptical, layers: "1:"`` (layer 0 standard).
    """

    name: str = "softmax"
    layers: LayerSpec = "all"
    default: str = "softmax"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class FFNConfig:
    """Feed-forward layers: ``dense``, ``switch`` (top-1, every layer) or ``glam`` (top-2, every other).

    ``layers`` selects which layers are MoE, the others dense (None: the variant's default). ``capacity_factor``
    None means dropless (no capacity limit). ``router_bias``: the router is ``Linear(d_model, n_experts)``
    with a bias (the MoE authors' ``nn.Linear`` gate) instead of without one (Switch's router).

    ``layout`` (instead of ``layers``): the FFN kind of every layer, ``moe`` / ``dense`` / ``none`` (attention
    only), as a list of ``n_layer`` kinds or a preset (``LAYOUTS``; formulas in ``layer_kinds``):
    ``glam_authors`` is the MoE authors' GLaM as their ``TransformerSeq`` builds it (docs/parity.md),
    ``glam_alternating`` the published GLaM (dense, MoE, dense, MoE, ...), ``all_moe`` Switch's.
    ``nested_norm``: the MoE sub-layer carries its own residual and LayerNorm, as the authors'
    ``CustomizedMoEPositionwiseFF``: the block's FFN half is ``LN2(h + LN_m(h + MoE(h)))`` instead of
    ``LN2(h + MoE(h))`` (post-norm only). ``expert_init``: ``model`` (default) draws the experts like the
    model's other Linear weights (``model.weight_init``); ``fmoe`` is FastMoE's ``FMoELinear``:
    ``kaiming_uniform_(a=sqrt(5))`` on each stacked ``[E, out, in]`` weight, whose fan-in is ``out * in``
    (bound ``1/sqrt(d_model * d_expert)``), and zero biases.
    """

    name: str = "dense"
    layers: LayerSpec | None = None
    n_experts: int = 16
    top_k: int | None = None
    capacity_factor: float | None = 1.25
    eval_capacity_factor: float | None = 2.0
    balance_loss_weight: float = 0.01
    z_loss_weight: float = 1e-3
    jitter: float = 0.0
    d_expert: int | None = None
    router_bias: bool = False
    layout: str | list[str] | None = None
    nested_norm: bool = False
    expert_init: str = "model"

    def __post_init__(self) -> None:
        _check_choice("ffn", self.name, ("dense", "switch", "glam"))
        _check_choice("ffn.expert_init", self.expert_init, ("model", "fmoe"))
        if self.layout is not None:
            if self.layers is not None:
                raise ConfigError("ffn.layers and ffn.layout both say where the MoE layers are: keep one "
                                  "(ffn.layout also names dense and attention-only layers).")
            if isinstance(self.layout, str):
                _check_choice("ffn.layout", self.layout, LAYOUTS)
            else:
                for kind in self.layout:
                    _check_choice("ffn.layout entry", kind, FFN_KINDS)
            if self.name == "dense" and (isinstance(self.layout, str) or "moe" in self.layout):  # presets have MoE
                raise ConfigError("ffn.layout puts MoE layers in a model with ffn.name: dense; set ffn.name: "
                                  "switch (top-1 default) or glam (top-2 default).")
        if self.name != "dense":
            if self.n_experts < 1:
                raise ConfigError(f"ffn.n_experts must be >= 1, got {self.n_experts}.")
            k = self.resolved_top_k
            if not 1 <= k <= self.n_experts:
                raise ConfigError(f"ffn.top_k={k} must be between 1 and n_experts={self.n_experts}.")
        for name in ("capacity_factor", "eval_capacity_factor"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ConfigError(f"ffn.{name} must be > 0 or null (dropless), got {v}.")

    @property
    def resolved_top_k(self) -> int:
        return self.top_k if self.top_k is not None else (1 if self.name == "switch" else 2)

    def moe_layers(self, n_layer: int) -> list[int]:
        return [i for i, kind in enumerate(self.layer_kinds(n_layer)) if kind == "moe"]

    def layer_kinds(self, n_layer: int | None) -> list[str]:
        """The FFN kind (``moe`` / ``dense`` / ``none``) of each of ``n_layer`` layers.

        Presets: ``all_moe``: every layer MoE. ``glam_alternating``: MoE in the odd layers, dense in the even
        ones (GLaM, Du et al. 2021; the project's ``glam`` default). ``glam_authors``: the MoE authors'
        ``TransformerSeq(base_arch="glam")`` appends, for each pair i, a layer with the letters
        ``arch[2i], arch[2i+1]`` (MoE if the second is ``g``) and one with ``arch[2i+2], arch[2i+3]`` (dense
        if the second is ``f``); their arch strings repeat ``sgsf`` (``rgef``), so the letter at 2i+1 is ``g``
        for even i and ``f`` for odd i. Layer 4j is MoE, 4j+1 dense, 4j+2 and 4j+3 attention only (GLaM-S:
        moe, dense, none, none, moe, dense). ``n_layer`` None: a list layout as given (for validation).
        """
        if isinstance(self.layout, list):
            if n_layer is not None and len(self.layout) != n_layer:
                raise ConfigError(f"ffn.layout lists {len(self.layout)} FFN kinds for a {n_layer}-layer model; "
                                  f"give one of {FFN_KINDS} per layer, or a preset {LAYOUTS}.")
            return list(self.layout)
        if n_layer is None:
            return []
        if self.layout == "all_moe":
            return ["moe"] * n_layer
        if self.layout == "glam_alternating":
            return ["moe" if i % 2 else "dense" for i in range(n_layer)]
        if self.layout == "glam_authors":
            if n_layer % 2:
                raise ConfigError(f"ffn.layout glam_authors builds (MoE-or-none, dense-or-none) pairs, so "
                                  f"model.n_layer must be even (their --nlayers x 2), got {n_layer}.")
            return [("moe", "dense", "none", "none")[i % 4] for i in range(n_layer)]
        if self.name == "dense":
            return ["dense"] * n_layer
        default = "all" if self.name == "switch" else "odd"
        moe = set(select_layers(self.layers if self.layers is not None else default, n_layer, "ffn.layers"))
        return ["moe" if i in moe else "dense" for i in range(n_layer)]


@dataclass
class ModelConfig:
    """The decoder. ``pos='absolute'`` is the Elliptical paper's WikiText-103 setting (sinusoidal
    absolute positions, no memory); ``pos='relative'`` is Transformer-XL proper (relative positional
    attention with ``mem_len`` segment memory); ``pos='span'`` is the MoE authors' host, the
    adaptive-span Transformer with a fixed span: every token attends to exactly the ``mem_len``
    previous tokens (not itself) over a per-layer cache that starts as zeros, with a learned position
    table ``key_pe [1, d_head, mem_len]`` shared by all layers and no u/v biases.

    ``embed_scale``: multiply the input embedding by ``sqrt(d_model)`` (XL's, default) or not (the MoE
    authors' plain ``nn.Embedding``; with ``adaptive: false, tie_weight: false`` the softmax is their
    untied full ``nn.Linear``).

    ``abs_pos_order`` (absolute positions only): ``up`` (default) numbers a segment's tokens 0..T-1;
    ``down`` numbers them T-1..0, so the last token is position 0, as the paper's code does (XL's
    ``pos_seq = arange(klen-1, -1, -1)``; under a key mask the last real token is 0). ``ln_init``: ``ones`` (default, PyTorch's LayerNorm weight 1)
    or ``normal``: weights drawn from N(1, ``init_std``) as the paper's (XL's) ``weights_init`` does;
    biases stay 0 either way.

    ``dropout_placement`` (where ``dropout`` applies besides the attention weights' ``dropatt``): ``xl``
    (default, Transformer-XL's) on the embeddings, the relative position embeddings, the attention output
    before its residual, after the FFN's ReLU and on its output (each expert's, in MoE layers) and on the
    final hidden states; ``authors`` (the MoE authors' ``models.py``) only after the FFN's / each expert's
    ReLU and once on the combined MoE output (``CustomizedMoEPositionwiseFF``'s ``dropout(core_out)``).
    ``weight_init``: ``normal`` (default) draws every Linear weight of the blocks from N(0, ``init_std``) with
    zero biases; ``torch`` keeps PyTorch's own ``nn.Linear`` initialisation (the MoE authors' code applies
    none). The embedding and softmax tables initialise themselves either way.
    """

    n_layer: int = 16
    d_model: int = 128
    n_head: int = 8
    d_head: int = 16
    d_inner: int = 2048
    dropout: float = 0.1
    dropatt: float = 0.0
    pos: str = "absolute"
    mem_len: int = 0
    clamp_len: int = -1
    same_length: bool = False
    norm: str = "post"
    adaptive: bool = True
    cutoffs: list[int] = field(default_factory=lambda: [20000, 40000, 200000])
    div_val: int = 1
    d_embed: int | None = None
    tie_weight: bool = True
    init_std: float = 0.02
    ln_init: str = "ones"
    abs_pos_order: str = "up"
    dropout_placement: str = "xl"
    weight_init: str = "normal"
    embed_scale: bool = True
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    ffn: FFNConfig = field(default_factory=FFNConfig)

    def __post_init__(self) -> None:
        # jsonargparse may hand nested configs over as dicts when loading from a checkpoint.
        if isinstance(self.attention, dict):
            self.attention = AttentionConfig(**self.attention)
        if isinstance(self.ffn, dict):
            self.ffn = FFNConfig(**self.ffn)
        _check_choice("model.pos", self.pos, ("absolute", "relative", "span"))
        _check_choice("model.norm", self.norm, ("post", "pre"))
        _check_choice("model.ln_init", self.ln_init, ("ones", "normal"))
        _check_choice("model.abs_pos_order", self.abs_pos_order, ("up", "down"))
        _check_choice("model.dropout_placement", self.dropout_placement, ("xl", "authors"))
        _check_choice("model.weight_init", self.weight_init, ("normal", "torch"))
        if self.ffn.nested_norm and self.norm != "post":
            raise ConfigError("ffn.nested_norm wraps the MoE output in its own residual + LayerNorm inside a "
                              "post-LayerNorm block (the MoE authors' layer); with model.norm: pre there is no "
                              "such block. Set model.norm: post or ffn.nested_norm: false.")
        if self.abs_pos_order == "down" and self.pos != "absolute":
            raise ConfigError(f"model.abs_pos_order 'down' numbers absolute positions; with model.pos: {self.pos} "
                              "there are none (distances are counted by the attention). Remove "
                              "model.abs_pos_order or set model.pos: absolute.")
        for name in ("n_layer", "d_model", "n_head", "d_head", "d_inner"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("dropout", "dropatt"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"model.{name} must be in [0, 1), got {getattr(self, name)}.")
        if self.mem_len < 0:
            raise ConfigError(f"model.mem_len must be >= 0, got {self.mem_len}.")
        if not self.init_std > 0:  # (also catches NaN) torch's normal_ would fail deep inside the model's init
            raise ConfigError(f"model.init_std is the standard deviation of the initial weights and must be > 0, "
                              f"got {self.init_std} (the recipes use 0.02).")
        if self.mem_len > 0 and self.pos == "absolute":
            raise ConfigError(
                "model.mem_len > 0 needs relative positions: absolute positions restart at 0 every "
                "segment, so remembered states would carry wrong positions. Set model.pos: relative "
                "(Transformer-XL) or model.mem_len: 0 (the Elliptical paper's setting)."
            )
        if self.same_length and (self.pos != "relative" or self.mem_len == 0):
            raise ConfigError("model.same_length needs relative positions and model.mem_len > 0 (it hides the "
                              "oldest keys so every query sees mem_len keys; without memory it hides all of them).")
        if list(self.cutoffs) != sorted(set(self.cutoffs)) or any(c <= 0 for c in self.cutoffs):
            raise ConfigError(f"model.cutoffs must be strictly increasing positive integers, got {self.cutoffs}.")
        if self.div_val < 1:
            raise ConfigError(f"model.div_val must be >= 1, got {self.div_val}.")
        # Layer selections are validated here, so a bad one fails when the config is built. Attention
        # variant names and options belong to the model's registry: the model checks them first thing when
        # it is built (lm.model.attention.check_config), so the config imports nothing of the model.
        self.attention_layers()
        self.ffn.layer_kinds(self.n_layer)
        if self.pos == "span":
            self._check_span()

    @property
    def has_memory(self) -> bool:
        """The decoder carries per-layer memory across segments (Transformer-XL or the span host)."""
        return self.pos in ("relative", "span") and self.mem_len > 0

    def _check_span(self) -> None:
        if self.mem_len < 1:
            raise ConfigError("model.pos: span attends to the model.mem_len previous tokens (the authors' "
                              "--attn-span) over a cache of that length; set model.mem_len >= 1 (e.g. 1024 or "
                              "2048 as in the MoE scripts), or use model.pos: absolute for a model without memory.")
        if self.same_length or self.clamp_len > 0:
            raise ConfigError("model.same_length and model.clamp_len belong to Transformer-XL's relative positions; "
                              "with model.pos: span every query already sees exactly model.mem_len keys and the "
                              "learned key_pe table has one entry per distance. Remove them or use model.pos: relative.")
        # Whether each layer's variant can run on the span host is the registry's to say: check_config.

    def attention_layers(self) -> list[str]:
        """The attention variant name of every layer."""
        chosen = set(select_layers(self.attention.layers, self.n_layer, "model.attention.layers"))
        return [self.attention.name if i in chosen else self.attention.default for i in range(self.n_layer)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class EvalConfig:
    """Evaluation protocol (docs/methods.md, "Evaluation protocols"); every result records it.

    - ``segments``: non-overlapping segments of ``tgt_len``, no context across segments.
    - ``memory``: Transformer-XL evaluation, ordered segments with ``mem_len`` recurrence.
    - ``sliding``: windows of ``tgt_len`` moved by ``stride``; every token scored exactly once, each
      (after the first window) with at least ``tgt_len - stride`` tokens of context.
    - ``full_eval``: the MoE authors' ``trainer.full_eval`` (a model with memory): the split cut into
      ``batch_size`` columns (the tail that does not fill a column dropped), ordered blocks of
      ``tgt_len`` with memory, only whole blocks, and only while the block starts before
      ``column_length - tgt_len``: NOT every target is scored; results record the scored fraction.
    ``None`` values fall back to the training ``tgt_len`` / the model's ``mem_len``/``clamp_len``.

    ``val_protocol``: what ``lm fit`` validates on. ``None`` (default): the whole valid split under ``protocol``.
    ``rolling``: the MoE authors' validation (``lm/data/rolling.py``): each validation scores the next
    ``val_blocks`` blocks of ``batch_size`` columns from where the previous one stopped, memory carried;
    ``lm validate``/``lm test`` still use ``protocol``.
    """

    protocol: str = "segments"
    tgt_len: int | None = None
    mem_len: int | None = None
    clamp_len: int | None = None
    stride: int | None = None
    batch_size: int = 10
    val_protocol: str | None = None
    val_blocks: int | None = None

    def __post_init__(self) -> None:
        _check_choice("eval.protocol", self.protocol, ("segments", "memory", "sliding", "full_eval"))
        if self.val_protocol is not None:
            _check_choice("eval.val_protocol", self.val_protocol, ("rolling",))
        if self.val_protocol == "rolling" and (self.val_blocks is None or self.val_blocks < 1):
            raise ConfigError(f"eval.val_protocol: rolling scores eval.val_blocks blocks per validation; set it to a "
                              f"number >= 1 (the MoE authors: max(1, nbatches // 10), 100 for --nbatches 1000), got "
                              f"{self.val_blocks}.")
        if self.val_blocks is not None and self.val_protocol != "rolling":
            raise ConfigError("eval.val_blocks is the size of a rolling validation; it needs eval.val_protocol: "
                              "rolling (or remove it: validation then scores the whole split).")
        if self.batch_size < 1:
            raise ConfigError(f"eval.batch_size must be >= 1, got {self.batch_size}.")
        if self.tgt_len is not None and self.tgt_len < 1:
            raise ConfigError(f"eval.tgt_len must be >= 1, got {self.tgt_len}.")
        if self.protocol == "sliding" and self.stride is not None:
            if self.stride < 1 or (self.tgt_len is not None and self.stride > self.tgt_len):
                raise ConfigError(f"eval.stride must be in [1, tgt_len], got {self.stride}.")


@dataclass
class OptimConfig:
    """Adam with linear warm-up then ``schedule`` (cosine to ``min_lr_ratio * lr``, as in the paper).

    ``schedule_convention`` (exact formulas in ``lm/tasks/schedule.py``):
    ``standard`` (default): update n (0-based) runs at (n + 1)/W during the W warm-up updates, then the
    decay spans the remaining updates. ``xl``: the Elliptical paper's train.py (Transformer-XL's): the
    first update runs at the full rate, update n at n/W while n < W, and the cosine is measured from
    step 0 over all ``max_steps`` updates, warm-up included. The paper's WikiText-103 recipes use ``xl``.
    """

    lr: float = 2.5e-4
    warmup_steps: int = 2000
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule_convention: str = "standard"

    def __post_init__(self) -> None:
        _check_choice("optim.schedule", self.schedule, ("cosine", "linear", "constant"))
        _check_choice("optim.schedule_convention", self.schedule_convention, ("standard", "xl"))
        if self.schedule_convention == "xl" and self.schedule == "linear":
            raise ConfigError("optim.schedule_convention 'xl' (Transformer-XL's train.py) has cosine and constant "
                              "schedules only; set optim.schedule: cosine or constant, or "
                              "optim.schedule_convention: standard for a linear decay.")
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}.")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}.")


def coerce(cls: type, value: Any) -> Any:
    """Accept a dataclass instance or its dict form (checkpoints store plain dicts, never pickles)."""
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        return cls(**value)
    raise ConfigError(f"expected {cls.__name__} or a mapping, got {type(value).__name__}")
