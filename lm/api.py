"""A trained model from Python::

    import lm
    model = lm.load("runs/wikitext2-tiny-softmax/checkpoints/last.ckpt")   # or an `lm export` folder
    model.score("The cat sat on the mat .")       # Score(nll=..., ppl=..., bpc=..., tokens=...)
    model.generate("The cat", max_new_tokens=20, temperature=0.8, top_k=40, seed=0)

Text is read the way the corpora are: word-level models split on whitespace and end every line with
``<eos>``, byte-level models read UTF-8 bytes. A text (and a prompt) is preceded by one line break
(``<eos>`` / ``\\n``) as its context, as every line of a corpus is, so its first token is scored too.

``score`` runs the model's own evaluation protocol (the one its checkpoint records: segments, memory or
sliding), so it equals ``lm test`` on a file holding the same text. ``generate`` samples token by token;
in the relative (Transformer-XL) setting it feeds only the new token each step and reuses the layer
memory, so the work per token does not grow with the text (``cache=False`` recomputes the window instead;
both give the same tokens while the text fits in the context). An exported folder holds only weights,
so the model cannot be trained further from it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lm import checkpoint
from lm.config import EvalConfig
from lm.errors import CheckpointError, ConfigError


@dataclass
class Score:
    nll: float  # mean negative log-likelihood per scored token (nats)
    ppl: float  # exp(nll): the word-level metric
    bpc: float  # nll / ln 2: the byte-level metric (bits per character)
    tokens: int  # scored tokens (words incl. one <eos> per line, or bytes)
    token_nll: list[float] = field(repr=False, default_factory=list)  # per scored token, in order


class Model:
    """A loaded language model: ``score``, ``generate``, ``encode``/``decode``; ``.lm`` is the
    ``LanguageModel`` (LightningModule), ``.net`` the bare decoder, ``.vocab`` the vocabulary."""

    def __init__(self, module, vocab, source: str = ""):
        self.lm, self.vocab, self.source = module.eval(), vocab, source
        self.net, self.cfg = module.net, module.cfg
        self.unit, self.tgt_len = module.unit, module.tgt_len

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.net.parameters())
        return (f"Model({self.source!r}, {n / 1e6:.2f}M parameters, {self.cfg.n_layer} layers, "
                f"attention {self.cfg.attention_layers()}, ffn {self.cfg.ffn.name}, pos {self.cfg.pos}, {self.vocab})")

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def to(self, device) -> Model:
        self.lm.to(device)
        return self

    @property
    def context(self) -> int:
        """Tokens the model attends to: its segment length plus, with memory (relative or span), its memory."""
        return self.tgt_len + (self.cfg.mem_len if self.cfg.has_memory else 0)

    # ----- text <-> ids ------------------------------------------------------------------------
    @property
    def _newline(self) -> int:
        return self.vocab.eos_id if self.unit == "word" else 10

    def encode(self, text: str, final_newline: bool = True) -> list[int]:
        """Ids of ``text``; ``final_newline=False`` leaves the last line open (a prompt to continue)."""
        from lm.data.corpora import split_lines

        if self.unit == "byte":
            data = text.encode("utf-8")
            return list(data + (b"\n" if final_newline and not data.endswith(b"\n") else b""))
        lines = split_lines(text)
        ids = self.vocab.encode_lines(lines, add_eos=True) if lines else []
        flat = [i for line in ids for i in line]
        if flat and not final_newline and not text.endswith(("\n", "\r")):
            flat.pop()  # the open last line has no <eos> yet
        return flat

    def decode(self, ids: list[int]) -> str:
        if self.unit == "byte":
            return bytes(int(i) for i in ids).decode("utf-8", errors="replace")
        out = []
        for i in ids:
            out.append("\n" if i == self.vocab.eos_id else self.vocab.id_to_token(i) + " ")
        return "".join(out).replace(" \n", "\n")

    # ----- scoring -----------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, text: str, protocol: EvalConfig | None = None) -> Score:
        """NLL, perplexity, bits per character and token count of ``text`` under the model's evaluation
        protocol (or ``protocol``), batch size 1."""
        from lm.data.protocols import MEMORY_PROTOCOLS, check_protocol, eval_batches

        ids = [self._newline] + self.encode(text)
        e = protocol or self.lm.eval_cfg
        e = dataclasses.replace(e, batch_size=1)
        check_protocol(e, self.cfg)
        memory = e.protocol in MEMORY_PROTOCOLS
        mem_len = (e.mem_len if e.mem_len is not None else self.cfg.mem_len) if memory else 0
        clamp_len = e.clamp_len if e.clamp_len is not None else self.cfg.clamp_len
        mems, nlls = None, []
        for batch in eval_batches(torch.tensor(ids), e, self.tgt_len):
            if batch["first"] or not memory:
                mems = None
            out = self.net(batch["input"].to(self.device), mems, mem_len=mem_len, clamp_len=clamp_len)
            mems = out.mems
            nll = self.net.nll(out.hidden, batch["target"].to(self.device))
            nlls.append(nll[batch["mask"].to(self.device)])
        flat = torch.cat(nlls).double()
        mean = float(flat.mean())
        return Score(mean, math.exp(mean), mean / math.log(2), int(flat.numel()), flat.tolist())

    # ----- generation --------------------------------------------------------------------------
    @torch.no_grad()
    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int = 50, temperature: float = 1.0,
                     top_k: int | None = None, seed: int | None = None, cache: bool = True) -> list[int]:
        """New token ids after ``prompt_ids`` (temperature 0: greedy)."""
        if max_new_tokens < 0 or temperature < 0 or (top_k is not None and top_k < 0):
            raise ConfigError("max_new_tokens, temperature and top_k must be >= 0 (temperature 0 = greedy, "
                              "top_k 0 or None = no limit).")
        gen = torch.Generator(device="cpu")
        gen.manual_seed(0 if seed is None else seed)
        ids = [self._newline] + list(prompt_ids)
        incremental = cache and self.cfg.pos == "relative"
        M, T = self.context - 1, self.tgt_len
        new: list[int] = []
        h = mems = None
        if incremental:  # the prompt in training-sized segments, each attending to the memory before it
            for i in range(0, len(ids), T):
                out = self.net(self._tensor(ids[i:i + T]), mems, mem_len=M)
                mems, h = out.mems, out.hidden[0, -1]
        for step in range(max_new_tokens):
            if not incremental:  # recompute over the last `context` tokens
                h = self.net(self._tensor(ids[-self.context:]), None, mem_len=0).hidden[0, -1]
            nxt = self._sample(self.net.log_prob(h[None])[0].float().cpu(), temperature, top_k, gen)
            ids.append(nxt)
            new.append(nxt)
            if incremental and step + 1 < max_new_tokens:
                out = self.net(self._tensor([nxt]), mems, mem_len=M)
                mems, h = out.mems, out.hidden[0, -1]
        return new

    def generate(self, prompt: str, max_new_tokens: int = 50, temperature: float = 1.0, top_k: int | None = None,
                 seed: int | None = None, cache: bool = True) -> str:
        """The continuation of ``prompt`` (text only, without the prompt)."""
        new = self.generate_ids(self.encode(prompt, final_newline=False), max_new_tokens, temperature, top_k,
                                seed, cache)
        text = self.decode(new)
        open_line = prompt and not prompt.endswith(("\n", " "))
        # Words are space-separated: a continuation of an open line starts with a space.
        return " " + text if self.unit == "word" and open_line and not text.startswith("\n") else text

    def _tensor(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor([ids], dtype=torch.long, device=self.device)

    @staticmethod
    def _sample(logp: torch.Tensor, temperature: float, top_k: int | None, gen: torch.Generator) -> int:
        if temperature == 0:
            return int(logp.argmax())
        logits = logp / temperature
        if top_k:
            kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))


def load(path: str | Path, device: str | torch.device = "cpu") -> Model:
    """A model from a ``lm fit`` checkpoint (``.ckpt``), an ``lm export`` folder, or ``hf://owner/name``
    (an exported folder on the Hugging Face hub, downloaded with ``huggingface_hub``)."""
    s = str(path)
    if s.startswith("hf://"):
        path = _hub_download(s[len("hf://"):])
    p = checkpoint.local_path(path, "lm.load")  # file:// -> its path; other URLs refused, never fetched/unpickled
    if p.is_dir():
        from lm.export import load_exported

        module, vocab = load_exported(p)
    elif p.is_file():
        from lm.tasks.pretrained import load_language_model

        module, vocab, _ = load_language_model(str(p))
    else:
        raise CheckpointError(f"{path}: no such checkpoint or folder. Pass a .ckpt written by `lm fit` (e.g. "
                              f"runs/<name>/checkpoints/last.ckpt), a folder written by `lm export`, or hf://owner/name.")
    return Model(module, vocab, s).to(device)


def _hub_download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id))
    except Exception as e:
        gist = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"Could not download hf://{repo_id} from the Hugging Face hub ({type(e).__name__}: "
                              f"{gist}). Check the name and the network, or download the folder by hand "
                              f"(huggingface-cli download {repo_id} --local-dir DIR) and pass DIR.") from None


__all__ = ["Model", "Score", "load"]
