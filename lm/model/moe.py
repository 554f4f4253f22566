"""Feed-forward layers for the decoder block: a dense FFN and a mixture-of-experts FFN.

Both return ONLY the FFN output; the block adds the residual and applies LayerNorm. That matters for
MoE: a token dropped by every expert it chose gets a zero FFN output, so it simply passes through the
residual connection (Switch Transformer, "tokens over capacity pass through the residual").

MoEFFN in one paragraph
-----------------------
A float32 router scores every token against every expert. Each token picks its top-k experts and gets
one combine weight per chosen expert (see ``gate`` below). The (token, slot) assignments are sorted by
expert id, so each expert's tokens form one contiguous slice; every expert runs once, on exactly its
slice (a Python loop over experts, never over tokens), and the weighted outputs are scatter-added back.
With a capacity factor, an expert keeps at most ``capacity`` assignments, in GShard/Switch priority
order (all first choices before any second choice; within a slot, in token order); the rest contribute
zero. After each forward the layer leaves ``aux_loss`` (weighted load-balancing + router z-loss) and a
``stats`` dict of detached tensors for logging.

Auxiliary losses (N tokens, E experts, k = top_k; p = softmax(router logits) over all experts)
---------------------------------------------------------------------------------------------
* load balancing:  ``alpha * E * sum_e f_e * P_e`` with
  ``f_e = (#top-k assignments routed to e, before capacity) / (N * k)`` and ``P_e = mean_n p[n, e]``.
  For k = 1 ``f_e`` is the fraction of tokens whose first choice is e: exactly the Switch loss. Dividing
  by N*k (not N) keeps sum_e f_e = 1, so perfectly uniform routing (f_e = P_e = 1/E) gives exactly alpha
  for any k, and all tokens on one expert gives alpha * E * P_0. Gradients flow through P only
  (f comes from a hard top-k and is not differentiable).
* router z-loss (ST-MoE): ``beta * mean_n logsumexp(logits[n])**2``; keeps logits small so the float32
  softmax stays well conditioned.
``aux_loss = balance + z`` (both already weighted); the model sums it over layers, the task adds it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lm.model.dropout import Dropout  # nn.Dropout with a cheap CPU mask (what a seed gives: see there)

GATES = ("auto", "softmax_then_topk", "topk_then_softmax")


class DenseFFN(nn.Module):
    """Transformer-XL's PositionwiseFF core: Linear - ReLU - Dropout - Linear - Dropout.

    Returns only the FFN output (no residual, no LayerNorm) so that dense and MoE layers are drop-in
    replacements for each other inside a block. ``out_dropout=False`` leaves out the last Dropout (the MoE
    authors' ``FeedForwardLayer``: dropout after the ReLU only); the state dict is the same either way.
    """

    def __init__(self, d_model: int, d_inner: int, dropout: float, out_dropout: bool = True) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_model, d_inner),
            # Not in place: Linear's 3-D output is a view of its 2-D GEMM result, and an in-place op on a view
            # costs three full copies of [B, T, d_inner] in backward (CopySlices); same values either way.
            nn.ReLU(),
            Dropout(dropout),
            nn.Linear(d_inner, d_model),
            Dropout(dropout) if out_dropout else nn.Identity(),
        )
        # Same interface as MoEFFN, so the model can sum aux losses without isinstance checks.
        self.aux_loss = None

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        # token_mask: MoEFFN's interface; a per-token FFN computes the same for real tokens either way.
        return self.net(x)


class MoEFFN(nn.Module):
    """Mixture-of-experts FFN (Switch / GLaM style) with capacity-limited or dropless dispatch.

    Args:
        d_model: model width (input and output size).
        d_expert: hidden size of each expert's FFN.
        dropout: dropout after the expert's ReLU and after its output projection (as in DenseFFN).
        n_experts: number of experts E.
        top_k: experts per token k.
        capacity_factor: training capacity factor; per-expert capacity is
            ``ceil(capacity_factor * n_tokens * top_k / n_experts)``. ``None`` = dropless.
        eval_capacity_factor: the same, used when ``not self.training``. ``None`` = dropless.
        balance_loss_weight: alpha of the load-balancing loss (Switch: 0.01).
        z_loss_weight: beta of the router z-loss (ST-MoE: 1e-3).
        jitter: training only, multiply the router input by U(1 - jitter, 1 + jitter) (Switch); 0 = off.
        gate: how the combine weights are computed from the router logits:
            * ``"softmax_then_topk"``: p = softmax over all E experts; each chosen expert is weighted by
              its p, unnormalised (Switch: the top-1 output is multiplied by the router probability,
              which is also how the router gets gradient from the main loss when k = 1).
            * ``"topk_then_softmax"``: softmax over the k selected logits only, so the weights sum to 1
              (GLaM/GShard-style renormalised top-2). With k = 1 the weight is always 1.0 and the router
              learns only from the aux losses, which is why it is not the k = 1 default.
            * ``"auto"`` (default): ``softmax_then_topk`` for k = 1, ``topk_then_softmax`` for k >= 2.
            Weights are never renormalised after capacity drops: a dropped assignment contributes zero.
        router_bias: give the router Linear a bias (the MoE authors' gate is ``nn.Linear(d_model, E)``,
            bias included; Switch's router has none).
        dropout_at: ``"expert"`` (default): dropout after each expert's ReLU and on each expert's output,
            before the combine weights. ``"output"`` (FastMoE as the MoE authors use it): after each expert's
            ReLU and once on the combined output (one mask per token, not one per expert).
        expert_init: ``"linear"`` (default): each expert like an ``nn.Linear`` pair (uniform +-1/sqrt(fan_in)
            for weights and biases). ``"fmoe"``: FastMoE's ``FMoELinear``: ``kaiming_uniform_(a=sqrt(5))`` on
            the stacked 3-D weight and zero biases (see ``reset_parameters``).

    Expert weights are stacked into four Parameters ``w1 [E, d_model, d_expert]``, ``b1 [E, d_expert]``,
    ``w2 [E, d_expert, d_model]``, ``b2 [E, d_model]``.

    After every forward: ``self.aux_loss`` (float32 scalar, balance + z, weighted) and ``self.stats``
    (detached: ``balance_loss``, ``z_loss``, ``expert_load [E]`` = f_e above, ``dropped_fraction``).

    Padding: ``forward(x, token_mask)`` with ``token_mask`` (bool, the input's leading shape, e.g.
    ``[B, T]``; False = pad; the decoder passes its ``key_mask``). Pad positions are then not routed at
    all: they take no expert capacity, count in neither the aux losses nor the stats, and get a zero FFN
    output. The real tokens are routed exactly as if the pads were absent, so with capacity limits their
    outputs no longer depend on HOW MUCH padding the batch has (they still depend on the other real
    tokens of the batch, as capacity is shared). ``None`` (default): every position is a token.
    """

    def __init__(
        self,
        d_model: int,
        d_expert: int,
        dropout: float,
        n_experts: int,
        top_k: int,
        capacity_factor: float | None,
        eval_capacity_factor: float | None,
        balance_loss_weight: float = 0.01,
        z_loss_weight: float = 1e-3,
        jitter: float = 0.0,
        gate: str = "auto",
        router_bias: bool = False,
        dropout_at: str = "expert",
        expert_init: str = "linear",
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and n_experts={n_experts}")
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
        for name, cf in [("capacity_factor", capacity_factor),
                         ("eval_capacity_factor", eval_capacity_factor)]:
            if cf is not None and cf < 0:  # 0 is allowed (drops everything; used in tests)
                raise ValueError(f"{name} must be >= 0 or None (dropless), got {cf}")
        if not 0.0 <= jitter < 1.0:
            raise ValueError(f"jitter must be in [0, 1), got {jitter}")
        if dropout_at not in ("expert", "output") or expert_init not in ("linear", "fmoe"):
            raise ValueError(f"dropout_at must be 'expert' or 'output' and expert_init 'linear' or 'fmoe', got "
                             f"{dropout_at!r}, {expert_init!r}")
        self.dropout_at, self.expert_init = dropout_at, expert_init
        self.d_model, self.d_expert = d_model, d_expert
        self.n_experts, self.top_k = n_experts, top_k
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.balance_loss_weight = balance_loss_weight
        self.z_loss_weight = z_loss_weight
        self.jitter = jitter
        self.gate = gate  # as given ("auto" allowed); resolved_gate is what forward uses
        if gate == "auto":
            gate = "softmax_then_topk" if top_k == 1 else "topk_then_softmax"
        self.resolved_gate = gate

        self.router = nn.Linear(d_model, n_experts, bias=router_bias)
        self.w1 = nn.Parameter(torch.empty(n_experts, d_model, d_expert))
        self.b1 = nn.Parameter(torch.empty(n_experts, d_expert))
        self.w2 = nn.Parameter(torch.empty(n_experts, d_expert, d_model))
        self.b2 = nn.Parameter(torch.empty(n_experts, d_model))
        self.drop = Dropout(dropout)
        self.reset_parameters()

        self.aux_loss: torch.Tensor | None = None
        self.stats: dict[str, torch.Tensor] = {}

    def reset_parameters(self) -> None:
        # "linear": each expert is initialised exactly like an nn.Linear pair (uniform +-1/sqrt(fan_in) for
        # weight and bias), so one expert is distributed like a DenseFFN of the same size. "fmoe": FastMoE's
        # FMoELinear calls kaiming_uniform_(a=sqrt(5)) on its [E, out, in] weight; torch takes a 3-D tensor's
        # fan-in as size(1) * size(2) = out * in, so the bound is 1/sqrt(out * in), not 1/sqrt(in). Our
        # stacked weights are [E, in, out]: the same product, hence the same call and the same bound. Biases 0.
        # The router keeps nn.Linear's default init; a host model that applies its own init scheme may
        # override both.
        for w, b, fan_in in ((self.w1, self.b1, self.d_model), (self.w2, self.b2, self.d_expert)):
            if self.expert_init == "fmoe":
                nn.init.kaiming_uniform_(w, a=math.sqrt(5))
                nn.init.zeros_(b)
                continue
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)
        self.router.reset_parameters()

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_expert={self.d_expert}, n_experts={self.n_experts}, "
            f"top_k={self.top_k}, gate={self.resolved_gate}, capacity_factor={self.capacity_factor}, "
            f"eval_capacity_factor={self.eval_capacity_factor}, jitter={self.jitter}, dropout_at={self.dropout_at}, "
            f"expert_init={self.expert_init}"
        )

    # ------------------------------------------------------------------------------------------ router
    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits [N, E] (float32), chosen experts [N, k] and combine weights [N, k] (float32)."""
        # float32 router even under autocast / bf16 weights: softmax over experts and the z-loss are
        # sensitive to rounding, and a flipped top-k choice changes which expert sees the token.
        with torch.autocast(device_type=h.device.type, enabled=False):
            r_in = h.float()
            if self.training and self.jitter > 0:
                # Multiplicative jitter (Switch): a little exploration for the router, training only.
                r_in = r_in * torch.empty_like(r_in).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            bias = self.router.bias
            logits = F.linear(r_in, self.router.weight.float(), None if bias is None else bias.float())
            top_logits, top_idx = logits.topk(self.top_k, dim=-1)
            if self.resolved_gate == "topk_then_softmax":
                weights = top_logits.softmax(dim=-1)
            else:
                weights = logits.softmax(dim=-1).gather(-1, top_idx)
        return logits, top_idx, weights

    def capacity(self, n_tokens: int) -> int | None:
        """Per-expert capacity for a batch of ``n_tokens`` tokens (None = dropless)."""
        cf = self.capacity_factor if self.training else self.eval_capacity_factor
        if cf is None:
            return None
        return int(math.ceil(cf * n_tokens * self.top_k / self.n_experts))

    # ----------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        h = x.reshape(-1, shape[-1])  # [N, D]
        if token_mask is None:
            return self._moe(h).reshape(shape)
        keep = token_mask.reshape(-1)
        if keep.numel() != h.shape[0]:
            raise ValueError(f"MoEFFN token_mask has shape {tuple(token_mask.shape)}, which does not match "
                             f"the input's leading shape {tuple(shape[:-1])}")
        idx = keep.nonzero().squeeze(1)  # real tokens, in order: their priority order is unchanged
        y = self._moe(h.index_select(0, idx))
        return y.new_zeros(h.shape[0], shape[-1]).index_copy(0, idx, y).reshape(shape)

    def _moe(self, h: torch.Tensor) -> torch.Tensor:
        """The layer on flat tokens ``h [N, D]`` -> ``[N, D]``; sets ``aux_loss`` and ``stats``."""
        shape = h.shape
        n_tok, n_exp, k = h.shape[0], self.n_experts, self.top_k

        logits, top_idx, weights = self.route(h)  # [N, E] fp32, [N, k], [N, k] fp32

        # ---- aux losses (float32, computed from the router before capacity) ----
        with torch.autocast(device_type=h.device.type, enabled=False):
            probs = logits.softmax(dim=-1)
            counts = torch.bincount(top_idx.reshape(-1), minlength=n_exp)  # [E], all k slots
            load = counts.float() / max(n_tok * k, 1)  # f_e, sums to 1
            mean_prob = probs.mean(dim=0) if n_tok > 0 else probs.new_zeros(n_exp)  # P_e
            balance = self.balance_loss_weight * n_exp * (load * mean_prob).sum()
            if n_tok > 0:
                z = self.z_loss_weight * torch.logsumexp(logits, dim=-1).pow(2).mean()
            else:
                z = logits.new_zeros(())

        # ---- dispatch: group assignments by expert ----
        # Flatten slot-major (all first choices, then all second choices, ...), so position j in the
        # flat list is (slot j // N, token j % N). A *stable* sort by expert id then leaves every expert's
        # assignments contiguous AND in priority order: slot first, token order within a slot. Capacity
        # keeps the head of each expert's run, which is exactly the GShard/Switch drop order.
        flat_expert = top_idx.t().reshape(-1)  # [k*N]
        flat_token = torch.arange(n_tok, device=h.device).repeat(k)  # [k*N]
        flat_weight = weights.t().reshape(-1)  # [k*N]
        sorted_expert, order = torch.sort(flat_expert, stable=True)

        cap = self.capacity(n_tok)
        if cap is not None:
            starts = torch.cumsum(counts, 0) - counts  # first sorted position of each expert's run
            rank_in_expert = torch.arange(sorted_expert.numel(), device=h.device) - starts[sorted_expert]
            keep = rank_in_expert < cap
            order = order[keep]  # still grouped by expert, still in priority order
            kept_counts = counts.clamp(max=cap)
        else:
            kept_counts = counts
        n_kept = order.numel()
        tok = flat_token[order]  # [M] token of each kept assignment, grouped by expert
        w = flat_weight[order]  # [M] its combine weight

        # ---- experts: one call per expert on its contiguous slice ----
        # Expert math runs in the input dtype (bf16 stays bf16; autocast may still lower the matmuls).
        dtype = h.dtype
        w1, b1, w2, b2 = (p.to(dtype) for p in (self.w1, self.b1, self.w2, self.b2))
        xs = h[tok]  # [M, D]
        outs = []
        for e, chunk in enumerate(xs.split(kept_counts.tolist())):  # .tolist(): one host sync per layer
            if chunk.shape[0] == 0:
                continue  # idle expert: nothing to compute (see the graph note below)
            hid = self.drop(F.relu(torch.addmm(b1[e], chunk, w1[e])))
            y_e = torch.addmm(b2[e], hid, w2[e])
            outs.append(self.drop(y_e) if self.dropout_at == "expert" else y_e)

        # Idle experts and data parallelism: the experts live in four stacked Parameters, so as soon as
        # ANY expert runs, all of w1/b1/w2/b2 are in the autograd graph and an idle expert's slice simply
        # receives an exact zero gradient; DDP with find_unused_parameters=False is satisfied without
        # running empty matmuls. Only when no expert runs at all (empty input, or everything dropped with
        # capacity 0) do we add 0 * sum(params) to keep the parameters (router included) in the graph.
        if outs:
            y = torch.cat(outs, dim=0)  # [M, D]
            out = y.new_zeros(n_tok, shape[-1])
            out.index_add_(0, tok, y * w.to(y.dtype).unsqueeze(-1))
        else:
            idle = w1.sum() + b1.sum() + w2.sum() + b2.sum() + sum(p.sum() for p in self.router.parameters()).to(dtype)
            out = h.new_zeros(n_tok, shape[-1]) + 0 * idle

        if self.dropout_at == "output":
            out = self.drop(out)
        self.aux_loss = balance + z
        dropped = (n_tok * k - n_kept) / max(n_tok * k, 1)  # 0.0 for an empty batch
        self.stats = {
            "balance_loss": balance.detach(),
            "z_loss": z.detach(),
            "expert_load": load.detach(),
            "dropped_fraction": torch.tensor(dropped, device=h.device),
        }
        return out
