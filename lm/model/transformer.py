"""The decoder: adaptive input -> N x Block -> adaptive softmax, in three host settings.

- ``pos='absolute'`` (the Elliptical paper's WikiText-103 setting): sinusoidal absolute positions
  added to the embeddings (which are scaled by sqrt(d_model)), no memory, post-LayerNorm.
- ``pos='relative'`` (Transformer-XL): relative positional attention over ``[memory; segment]``,
  where memory holds each layer's detached inputs from the previous segments.
- ``pos='span'`` (the MoE authors' adaptive-span Transformer, fixed span ``mem_len``): the same memory,
  but always exactly ``mem_len`` long (zeros before the first segment, as their cache starts), each
  token attending to the ``mem_len`` tokens before it and not itself, with a learned position table
  ``key_pe`` shared by all layers (``positions.span_mask`` / ``span_skew``).

Each layer's attention variant comes from the registry (``model.attention``); each attention layer
hands a ``LayerState`` (its values) to the next, which is what Elliptical's estimator reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lm.config import ModelConfig
from lm.errors import ConfigError
from lm.model.adaptive import AdaptiveEmbedding, AdaptiveLogSoftmax
from lm.model.attention import AttnContext, LayerState, build_attention, check_config
from lm.model.dropout import Dropout
from lm.model.moe import DenseFFN, MoEFFN
from lm.model.positions import attention_mask, padding_mask, relative_positions, sinusoid, span_mask, span_padding


class Block(nn.Module):
    """attention + FFN, each with residual and LayerNorm (post-LN as in the paper, or pre-LN).

    ``ffn`` None: an attention-only layer (the MoE authors' GLaM has some): no FFN and no second LayerNorm.
    ``nested_norm`` (post-LN only): the FFN sub-layer has its own residual + LayerNorm ``norm_ffn`` inside the
    block's, ``norm2(h + norm_ffn(h + ffn(h)))`` (the authors' ``CustomizedMoEPositionwiseFF``).
    ``attn_dropout`` False: no dropout on the attention output before its residual (the authors' layer).
    """

    def __init__(self, attn: nn.Module, ffn: nn.Module | None, d_model: int, dropout: float, pre_norm: bool,
                 nested_norm: bool = False, attn_dropout: bool = True):
        super().__init__()
        self.attn, self.ffn, self.pre_norm = attn, ffn, pre_norm
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model) if ffn is not None else None
        self.norm_ffn = nn.LayerNorm(d_model) if nested_norm and ffn is not None else None
        self.drop = Dropout(dropout) if attn_dropout else nn.Identity()

    def forward(self, h: Tensor, mem: Tensor | None, ctx: AttnContext, prev: LayerState | None,
                token_mask: Tensor | None = None):
        """``token_mask`` (bool ``[B, T]``, False = padding) goes to the FFN: MoE layers do not route pads."""
        if self.pre_norm:
            a, state = self.attn(self.norm1(h), None if mem is None else self.norm1(mem), ctx, prev)
            h = h + self.drop(a)
            return (h if self.ffn is None else h + self.ffn(self.norm2(h), token_mask)), state
        a, state = self.attn(h, mem, ctx, prev)
        h = self.norm1(h + self.drop(a))
        if self.ffn is None:
            return h, state
        f = self.ffn(h, token_mask)
        if self.norm_ffn is not None:
            f = self.norm_ffn(h + f)
        return self.norm2(h + f), state


@dataclass
class ModelOutput:
    hidden: Tensor  # [B, T, d_model], final layer (after dropout), input to the softmax
    mems: list[Tensor] | None = None  # per layer [B, M', d_model], detached
    aux_loss: Tensor | None = None  # sum of the MoE layers' auxiliary losses
    attentions: list[Tensor] | None = None  # per layer [B, H, T, S] when need_weights
    hidden_states: list[Tensor] | None = field(default=None)  # per layer outputs when requested


class TransformerLM(nn.Module):
    """The decoder. ``lm_head=False`` leaves out the adaptive softmax (``head`` is None): a host that
    reads the hidden states only (the SST-2 classifier) carries no LM-softmax parameters."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, lm_head: bool = True):
        check_config(cfg)  # before any weight is drawn: a typo costs no time
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        d, relative, span = cfg.d_model, cfg.pos == "relative", cfg.pos == "span"
        cutoffs = list(cfg.cutoffs) if cfg.adaptive else []
        d_embed = cfg.d_embed or d
        self.embed = AdaptiveEmbedding(vocab_size, d_embed, d, cutoffs, cfg.div_val, cfg.init_std,
                                       scale=cfg.embed_scale)
        self.head = AdaptiveLogSoftmax(vocab_size, d_embed, d, cutoffs, cfg.div_val,
                                       tie_to=self.embed if cfg.tie_weight else None, init_std=cfg.init_std)
        xl_dropout = cfg.dropout_placement == "xl"  # else the MoE authors': inside the FFNs only
        # Embeddings, relative position embeddings and the final hidden states (Transformer-XL's sites).
        self.drop = Dropout(cfg.dropout) if xl_dropout else nn.Identity()
        names, kinds = cfg.attention_layers(), cfg.ffn.layer_kinds(cfg.n_layer)
        blocks = []
        for i, name in enumerate(names):
            options = cfg.attention.options if name == cfg.attention.name else {}
            attn = build_attention(name, d_model=d, n_head=cfg.n_head, d_head=cfg.d_head, dropatt=cfg.dropatt,
                                   layer_idx=i, relative=relative, options=options, span=span)
            blocks.append(Block(attn, self._ffn(cfg, kinds[i]), d, cfg.dropout, cfg.norm == "pre",
                                nested_norm=cfg.ffn.nested_norm and kinds[i] == "moe", attn_dropout=xl_dropout))
        self.layers = nn.ModuleList(blocks)
        self.final_norm = nn.LayerNorm(d) if cfg.norm == "pre" else nn.Identity()
        # The authors' key_pe: torch.randn(1, d_head, attn_span), one table for every layer (unit variance).
        self.key_pe = nn.Parameter(torch.randn(1, cfg.d_head, cfg.mem_len)) if span else None
        self.apply(self._init)
        if not lm_head:
            # Dropped only now: the head's initialisation draws random numbers (and, tied, re-initialises the
            # embedding through the shared weights), so leaving it out earlier would change what a seed gives.
            self.head = None

    @staticmethod
    def _ffn(cfg: ModelConfig, kind: str) -> nn.Module | None:
        f, xl_dropout = cfg.ffn, cfg.dropout_placement == "xl"
        if kind == "none":
            return None
        if kind == "dense":
            return DenseFFN(cfg.d_model, cfg.d_inner, cfg.dropout, out_dropout=xl_dropout)
        return MoEFFN(cfg.d_model, f.d_expert or cfg.d_inner, cfg.dropout, f.n_experts, f.resolved_top_k,
                      f.capacity_factor, f.eval_capacity_factor, f.balance_loss_weight, f.z_loss_weight, f.jitter,
                      router_bias=f.router_bias, dropout_at="expert" if xl_dropout else "output",
                      expert_init="fmoe" if f.expert_init == "fmoe" else "linear")

    def _init(self, m: nn.Module) -> None:
        # Embedding/softmax tables initialise themselves (adaptive.py); here the blocks. weight_init "torch"
        # keeps what each module drew when it was built (nn.Linear's default; experts per ffn.expert_init).
        normal = self.cfg.weight_init == "normal"
        if isinstance(m, nn.Linear) and normal:
            nn.init.normal_(m.weight, 0.0, self.cfg.init_std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and self.cfg.ln_init == "normal":  # the paper's weights_init
            nn.init.normal_(m.weight, 1.0, self.cfg.init_std)
            nn.init.zeros_(m.bias)
        elif isinstance(m, MoEFFN) and normal and self.cfg.ffn.expert_init == "model":
            # stacked expert weights: same init as the dense FFN's Linears
            for w in (m.w1, m.w2):
                nn.init.normal_(w, 0.0, self.cfg.init_std)
            for b in (m.b1, m.b2):
                nn.init.zeros_(b)

    # ------------------------------------------------------------------------------------------------
    def forward(self, tokens: Tensor, mems: list[Tensor] | None = None, mem_len: int | None = None,
                clamp_len: int | None = None, need_weights: bool = False,
                output_hidden_states: bool = False, key_mask: Tensor | None = None) -> ModelOutput:
        """``tokens [B, T]`` -> final hidden states; ``mems`` from the previous segment (relative setting).

        ``mem_len``/``clamp_len`` default to the config's; evaluation may pass longer ones (XL protocol).
        ``key_mask`` (bool ``[B, T]``, False = padding; memory positions count as real) makes padding
        invisible to the real tokens: no query attends a pad key (a pad query attends only itself, so no
        row is empty), absolute positions count real tokens only (left padding does not shift them),
        per-sequence statistics such as Elliptical's m̂ leave pads out (``AttnContext.key_mask``) and MoE
        layers do not route pads. For attention that honours ``AttnContext.mask`` with a dense or
        dropless FFN, a padded row then equals the same row computed alone.
        """
        cfg = self.cfg
        mem_len = cfg.mem_len if mem_len is None else mem_len
        clamp_len = cfg.clamp_len if clamp_len is None else clamp_len
        B, T = tokens.shape
        if cfg.pos == "span":
            mems = self._span_cache(mems, mem_len, B, tokens.device)
        mlen = mems[0].size(1) if mems else 0
        if key_mask is not None and bool(key_mask.all()):
            key_mask = None  # no padding: the plain path (SDPA's causal kernel, bit-identical results)
        # Pads AFTER a row's last real token are never seen by a real query (attention is causal), so
        # only pads in front of real tokens (the classifier's left padding) need a mask and shifted positions.
        leading = key_mask is not None and bool((~key_mask[:, :-1] & key_mask[:, 1:]).any())
        h = self.embed(tokens)
        mask = rel_pos = None
        if cfg.pos == "absolute":
            if cfg.abs_pos_order == "down" and key_mask is not None:  # the last REAL token is position 0
                pos = (key_mask.flip(1).long().cumsum(1).flip(1) - 1).clamp_min(0)
                h = h + sinusoid(pos.reshape(-1), cfg.d_model).view(B, T, -1).to(h.dtype)
            elif cfg.abs_pos_order == "down":  # the paper's code numbers a segment T-1..0
                h = h + sinusoid(torch.arange(T - 1, -1, -1, device=tokens.device), cfg.d_model).to(h.dtype)
            elif leading:  # position 0 is each row's first real token
                pos = (key_mask.long().cumsum(1) - 1).clamp_min(0)
                h = h + sinusoid(pos.reshape(-1), cfg.d_model).view(B, T, -1).to(h.dtype)
            else:
                h = h + sinusoid(torch.arange(T, device=tokens.device), cfg.d_model).to(h.dtype)
        elif cfg.pos == "span":
            mask = span_mask(T, mlen, tokens.device)
        else:  # relative positions are shift-invariant: padding needs no change here
            mask = attention_mask(T, mlen, tokens.device, cfg.same_length, mem_len)
            rel_pos = self.drop(sinusoid(relative_positions(T + mlen, clamp_len, tokens.device), cfg.d_model).to(h.dtype))
        keys = span_index = None
        if key_mask is not None:
            keys = key_mask if mlen == 0 else torch.cat([key_mask.new_ones(B, mlen), key_mask], dim=1)
            if leading and cfg.pos == "span":  # the span and its distances count real positions only
                mask, span_index = span_padding(keys, T, mlen)
            elif leading:
                mask = padding_mask(mask, keys, T)
        ctx = AttnContext(mask=mask, rel_pos=rel_pos, need_weights=need_weights, key_mask=keys, key_pe=self.key_pe,
                          span_index=span_index)
        h = self.drop(h)

        inputs, attentions, states = [], [] if need_weights else None, [] if output_hidden_states else None
        prev = None
        for i, block in enumerate(self.layers):
            inputs.append(h)
            h, prev = block(h, mems[i] if mems else None, ctx, prev, key_mask)
            if need_weights:
                attentions.append(prev.weights)
            if output_hidden_states:
                states.append(h)
        h = self.drop(self.final_norm(h))
        new_mems = self._update_mems(inputs, mems, mem_len) if mem_len > 0 else None
        return ModelOutput(h, new_mems, self.aux_loss(), attentions, states)

    def _span_cache(self, mems: list[Tensor] | None, mem_len: int, B: int, device) -> list[Tensor]:
        """The span host's per-layer cache: exactly ``mem_len`` positions, zeros when there is none yet (the
        authors' ``h_cache`` starts as zeros and the first block attends to them through ``key_pe``)."""
        span = self.cfg.mem_len
        if mem_len not in (0, span):
            raise ConfigError(f"model.pos: span attends to exactly model.mem_len={span} previous tokens (its key_pe "
                              f"table has that many entries); an evaluation memory of {mem_len} cannot be used. "
                              f"Leave eval.mem_len unset or set it to {span}.")
        if not mems:
            dtype = self.embed.emb_layers[0].weight.dtype
            return [torch.zeros(B, span, self.cfg.d_model, device=device, dtype=dtype) for _ in self.layers]
        if len(mems) != len(self.layers) or any(m.size(1) != span or m.size(0) != B for m in mems):
            raise ConfigError(f"the span host's memory must hold {len(self.layers)} tensors of [{B}, {span}, d_model]; "
                              f"got {[tuple(m.shape) for m in mems]} (memory from another model or batch size).")
        return mems

    @torch.no_grad()
    def _update_mems(self, inputs: list[Tensor], mems: list[Tensor] | None, mem_len: int) -> list[Tensor]:
        # Memory = each layer's input over the last mem_len positions, with no gradient (XL's stop-grad).
        out = []
        for i, h in enumerate(inputs):
            cat = h if not mems else torch.cat([mems[i], h], dim=1)
            out.append(cat[:, -mem_len:].detach())
        return out

    def aux_loss(self) -> Tensor | None:
        losses = [blk.ffn.aux_loss for blk in self.layers if getattr(blk.ffn, "aux_loss", None) is not None]
        return torch.stack(losses).sum() if losses else None

    def nll(self, hidden: Tensor, target: Tensor) -> Tensor:
        """Per-token negative log-likelihood ``[B, T]`` (float32)."""
        return self.head.nll(hidden, target)

    def log_prob(self, hidden: Tensor) -> Tensor:
        return self.head.log_prob(hidden)
