"""A trained model from Python (``lm generate`` is lm/generate.py)::

    import lm
    model = lm.load("runs/wikitext2-tiny-softmax/checkpoints/last.ckpt")   # or an `lm export` folder
    model.score("The cat sat on the mat .")       # Score(nll=..., ppl=..., bpc=..., tokens=...)
    model.score_many(["The cat .", "A dog ."])    # [Score, Score], batched
    model.generate("The cat", max_new_tokens=20, temperature=0.8, top_k=40, seed=0)
    model.save_pretrained("exported/tiny"); lm.Model.from_pretrained("owner/name")   # an export; the Hub

Text is read as the corpora are: word-level models split on whitespace and end every line with ``<eos>``,
byte-level models read UTF-8 bytes. A text (and a prompt) is preceded by one line break (``<eos>``/``\\n``) as
its context, as every line of a corpus is, so its first token is scored too. ``score`` runs the model's own
evaluation protocol (segments, memory or sliding), so it equals ``lm test`` on a file holding the same text.
``generate`` samples token by token; in the relative (Transformer-XL) setting it feeds only the new token each
step and reuses the layer memory (``cache=False`` recomputes the window: the same tokens while the text fits
in the context). ``stream`` yields the text as it is made, as ``lm generate`` prints it, holding only the
context in memory. An exported folder holds only weights: the model cannot be trained further from it.
"""

from __future__ import annotations

import codecs
import dataclasses
import math
import re
import tempfile
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lm import checkpoint
from lm import export as exp
from lm.config import EvalConfig
from lm.errors import CheckpointError, ConfigError

# One set of generation defaults for Model.generate and `lm generate`: the model's own distribution.
MAX_NEW_TOKENS, TEMPERATURE, TOP_K, TOP_P, SEED = 50, 1.0, None, None, 0


@dataclass
class Score:
    nll: float  # mean negative log-likelihood per scored token (nats)
    ppl: float  # exp(nll): the word-level metric
    bpc: float  # nll / ln 2: the byte-level metric (bits per character)
    tokens: int  # scored tokens (words incl. one <eos> per line, or bytes)
    token_nll: list[float] = field(repr=False, default_factory=list)  # per scored token, in order


def check_text(text, what: str = "The text") -> str:
    """``text`` as a str that encodes to UTF-8 (bytes are decoded strictly), or one paragraph saying why not."""
    if isinstance(text, bytes):
        try:
            return text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{what} is not UTF-8 (byte {text[e.start]:#04x} at offset {e.start}): pass UTF-8 text, "
                              f"e.g. re-encode a file with `iconv -t UTF-8`.") from None
    if not isinstance(text, str):
        raise ConfigError(f"{what} must be a str, got {type(text).__name__}.")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate: from Python, or an undecodable byte in a shell argument
        raise ConfigError(f"{what} holds {text[e.start]!r} at character {e.start}, a lone surrogate that no UTF-8 text "
                          f"has (a shell argument with bytes that are not UTF-8 arrives this way): pass UTF-8 text, "
                          f"e.g. a file re-encoded with `iconv -t UTF-8` via --prompt_file.") from None
    return text


def check_sampling(max_new_tokens, temperature, top_k, top_p, num_samples) -> None:
    def is_int(x):
        return isinstance(x, int) and not isinstance(x, bool)

    problems = []
    if not is_int(max_new_tokens) or max_new_tokens < 0:
        problems.append(f"max_new_tokens {max_new_tokens!r} (an integer >= 0)")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        problems.append(f"temperature {temperature!r} (a finite number >= 0; 0 is greedy)")
    if top_k is not None and (not is_int(top_k) or top_k < 0):
        problems.append(f"top_k {top_k!r} (an integer >= 0; 0 or None: no limit)")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        problems.append(f"top_p {top_p!r} (in (0, 1]; None or 1: no limit)")
    if num_samples is not None and (not is_int(num_samples) or num_samples < 1):
        problems.append(f"num_samples {num_samples!r} (an integer >= 1)")
    if problems:
        raise ConfigError(f"Invalid generation settings: {'; '.join(problems)}.")


def check_device(device) -> torch.device:
    try:
        d = torch.device(device)
        torch.empty(0, device=d)
        return d
    except Exception as e:  # RuntimeError for a bad name, AssertionError from a CPU-only torch asked for CUDA
        gist = (str(e).strip().splitlines() or [""])[0][:160]
        raise ConfigError(f"Device {str(device)!r} is not usable here ({type(e).__name__}: {gist}). Use 'cpu', or "
                          f"'cuda' / 'cuda:N' with a CUDA build of torch on a machine with a GPU (this torch: "
                          f"{torch.__version__}, CUDA available: {torch.cuda.is_available()}).") from None


class Model:
    """A loaded language model: ``score``/``score_many``, ``generate``/``stream``, ``encode``/``decode``,
    ``save_pretrained``/``push_to_hub``/``from_pretrained``; ``.lm`` is the ``LanguageModel`` (LightningModule),
    ``.net`` the bare decoder, ``.vocab`` the vocabulary."""

    def __init__(self, module, vocab, source: str = "", meta: dict | None = None):
        self.lm, self.vocab, self.source, self.meta = module.eval(), vocab, source, dict(meta or {})
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
        self.lm.to(check_device(device))
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

        text = check_text(text)
        if self.unit == "byte":
            data = text.encode("utf-8")
            return list(data + (b"\n" if final_newline and data and not data.endswith(b"\n") else b""))
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
    def score(self, text: str, protocol: EvalConfig | None = None) -> Score:
        """NLL, perplexity, bits per character and token count of ``text`` under the model's evaluation
        protocol (or ``protocol``)."""
        return self.score_many([text], protocol)[0]

    @torch.no_grad()
    def score_many(self, texts: list[str], protocol: EvalConfig | None = None, batch_size: int = 16) -> list[Score]:
        """``score`` of each text, ``batch_size`` texts per forward pass: the texts' segments (or windows) go
        through the model side by side, each with its own memory, so every result is that text's ``score``."""
        from lm.data.protocols import MEMORY_PROTOCOLS, check_protocol, eval_batches, resolve

        if isinstance(texts, (str, bytes)):
            raise ConfigError("score_many takes a list of texts; for one text use score(text).")
        e = dataclasses.replace(protocol or self.lm.eval_cfg, batch_size=1)
        check_protocol(e, self.cfg)
        memory = e.protocol in MEMORY_PROTOCOLS
        mem_len = (e.mem_len if e.mem_len is not None else self.cfg.mem_len) if memory else 0
        clamp_len = e.clamp_len if e.clamp_len is not None else self.cfg.clamp_len
        streams = []
        for i, t in enumerate(texts):
            ids = [self._newline] + self._scored_ids(t, i)
            T, S = resolve(e, self.tgt_len)
            # A text shorter than the window is one window of its own length (not padded to tgt_len): the same
            # scores (padding is masked), and a window of 10^12 from a mistyped config allocates nothing.
            n = len(ids) - 1
            fit = e if n >= T else dataclasses.replace(e, tgt_len=n, stride=min(S, n) if e.stride else None)
            streams.append(list(eval_batches(torch.tensor(ids), fit, self.tgt_len)))
        scores = []
        for c in range(0, len(streams), max(1, batch_size)):
            chunk = streams[c:c + max(1, batch_size)]
            nlls, mems = [[] for _ in chunk], [None] * len(chunk)
            for j in range(max(len(s) for s in chunk)):
                groups: dict[int, list[int]] = {}  # rows of one width share a forward pass (no extra padding)
                for i, s in enumerate(chunk):
                    if j < len(s):
                        groups.setdefault(s[j]["input"].size(1), []).append(i)
                for rows in groups.values():
                    b = {k: torch.cat([chunk[i][j][k] for i in rows]).to(self.device)
                         for k in ("input", "target", "mask", "real")}
                    m = [torch.cat(layer) for layer in zip(*(mems[i] for i in rows))] if mems[rows[0]] else None
                    out = self.net(b["input"], m, mem_len=mem_len, clamp_len=clamp_len, key_mask=b["real"])
                    nll = self.net.nll(out.hidden, b["target"])
                    for r, i in enumerate(rows):
                        nlls[i].append(nll[r][b["mask"][r]])
                        mems[i] = [x[r:r + 1] for x in out.mems] if memory and out.mems else None
            for parts in nlls:
                flat = torch.cat(parts).double()
                mean = float(flat.mean())
                scores.append(Score(mean, math.exp(mean), mean / math.log(2), int(flat.numel()), flat.tolist()))
        return scores

    def _scored_ids(self, text: str, index: int) -> list[int]:
        ids = self.encode(text)
        if not ids or (self.unit == "word" and all(i == self.vocab.eos_id for i in ids)):
            raise ConfigError(f"Text {index} ({text[:40]!r}) has nothing to score: it is empty"
                              f"{' or holds only whitespace (no words)' if self.unit == 'word' else ''}. Pass a text "
                              f"with at least one {'word' if self.unit == 'word' else 'character'}.")
        return ids

    # ----- generation --------------------------------------------------------------------------
    @torch.no_grad()
    def _ids(self, prompt_ids: list[int], max_new_tokens: int, temperature: float, top_k: int | None,
             top_p: float | None, gen: torch.Generator, cache: bool, stop_at_eos: bool) -> Iterator[int]:
        ids = deque([self._newline] + list(prompt_ids), maxlen=max(self.context, len(prompt_ids) + 1))
        incremental = cache and self.cfg.pos == "relative"
        M, T = self.context - 1, self.tgt_len
        h = mems = None
        if incremental:  # the prompt in training-sized segments, each attending to the memory before it
            prompt = list(ids)
            for i in range(0, len(prompt), T):
                out = self.net(self._tensor(prompt[i:i + T]), mems, mem_len=M)
                mems, h = out.mems, out.hidden[0, -1]
        for step in range(max_new_tokens):
            if not incremental:  # recompute over the last `context` tokens
                h = self.net(self._tensor(list(ids)[-self.context:]), None, mem_len=0).hidden[0, -1]
            nxt = self._sample(self.net.log_prob(h[None])[0].float().cpu(), temperature, top_k, top_p, gen)
            if stop_at_eos and nxt == self._newline:
                return
            ids.append(nxt)
            yield nxt
            if incremental and step + 1 < max_new_tokens:
                out = self.net(self._tensor([nxt]), mems, mem_len=M)
                mems, h = out.mems, out.hidden[0, -1]

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int = MAX_NEW_TOKENS,
                     temperature: float = TEMPERATURE, top_k: int | None = TOP_K, seed: int | None = SEED,
                     cache: bool = True, top_p: float | None = TOP_P, stop_at_eos: bool = False) -> list[int]:
        """New token ids after ``prompt_ids`` (temperature 0: greedy)."""
        check_sampling(max_new_tokens, temperature, top_k, top_p, None)
        return list(self._ids(prompt_ids, max_new_tokens, temperature, top_k, top_p, self._generator(seed), cache,
                              stop_at_eos))

    def stream(self, prompt: str = "", max_new_tokens: int = MAX_NEW_TOKENS, temperature: float = TEMPERATURE,
               top_k: int | None = TOP_K, top_p: float | None = TOP_P, seed: int | None = SEED, cache: bool = True,
               stop_at_eos: bool = False, _gen: torch.Generator | None = None) -> Iterator[str]:
        """The continuation of ``prompt`` piece by piece (a word with its leading space, a line break, or the
        characters a byte completes), as it is generated; ``"".join`` of it is ``generate``'s text."""
        check_sampling(max_new_tokens, temperature, top_k, top_p, None)
        prompt = check_text(prompt, "The prompt")
        ids = self._ids(self.encode(prompt, final_newline=False), max_new_tokens, temperature, top_k, top_p,
                        _gen or self._generator(seed), cache, stop_at_eos)
        if self.unit == "byte":
            utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
            for i in ids:
                if piece := utf8.decode(bytes([i])):
                    yield piece
            if tail := utf8.decode(b"", final=True):
                yield tail
            return
        space = bool(prompt) and not prompt[-1].isspace()  # words are space-separated; a new line starts bare
        for i in ids:
            if i == self.vocab.eos_id:
                space = False
                yield "\n"
            else:
                yield (" " if space else "") + self.vocab.id_to_token(i)
                space = True

    def generate(self, prompt: str = "", max_new_tokens: int = MAX_NEW_TOKENS, temperature: float = TEMPERATURE,
                 top_k: int | None = TOP_K, seed: int | None = SEED, cache: bool = True, top_p: float | None = TOP_P,
                 stop_at_eos: bool = False, num_samples: int | None = None) -> str | list[str]:
        """The continuation of ``prompt`` (text only, without the prompt); with ``num_samples``, a list of that
        many continuations drawn one after another from the seed (the first is the one ``num_samples=None``
        gives). ``top_k``/``top_p`` keep the k most likely tokens / the smallest set holding probability p;
        ``stop_at_eos`` ends a continuation at the end of its line (``<eos>``, or ``\\n`` for bytes)."""
        check_sampling(max_new_tokens, temperature, top_k, top_p, num_samples)
        gen = self._generator(seed)
        out = ["".join(self.stream(prompt, max_new_tokens, temperature, top_k, top_p, seed, cache, stop_at_eos, gen))
               for _ in range(num_samples or 1)]
        return out if num_samples is not None else out[0]

    def _tensor(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor([ids], dtype=torch.long, device=self.device)

    @staticmethod
    def _generator(seed: int | None) -> torch.Generator:
        gen = torch.Generator(device="cpu")
        gen.manual_seed(SEED if seed is None else int(seed))
        return gen

    @staticmethod
    def _sample(logp: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                gen: torch.Generator) -> int:
        if bool(torch.isnan(logp).any()):
            raise CheckpointError("The model gave NaN log-probabilities (its weights are finite, so the forward pass "
                                  "overflowed): run it in float32 on the CPU, or use another checkpoint.")
        if temperature == 0:
            return int(logp.argmax())
        # Shifted so the best token is 0, in float64: a tiny temperature (1e-45) sends the others to -inf, not NaN.
        logits = (logp.double() - logp.max()) / temperature
        if top_k:
            kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p is not None and top_p < 1:
            p, order = torch.softmax(logits, -1).sort(descending=True)
            drop = order[(p.cumsum(0) - p) >= top_p]  # tokens after the kept set already reached top_p
            logits = logits.index_fill(0, drop, float("-inf"))
        return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))

    # ----- export and the Hub ------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path, force: bool = False) -> Path:
        """Write this model as an ``lm export`` folder (docs/export.md); ``force`` as ``lm export --force``."""
        return exp.write(self.lm, self.vocab, folder, {"source": self.source, **self.meta}, force=force)

    def push_to_hub(self, repo_id: str, token: str | None = None, endpoint: str | None = None) -> str:
        """Upload this model, exported, to the Hugging Face Hub (``huggingface_hub``'s API); the commit's URL."""
        with tempfile.TemporaryDirectory() as tmp:
            return exp.push(self.save_pretrained(Path(tmp) / "export"), repo_id, token=token, endpoint=endpoint,
                            retry=f"Then try model.push_to_hub('{repo_id}') again")

    @classmethod
    def from_pretrained(cls, name: str | Path, device: str | torch.device = "cpu", revision: str | None = None,
                        token: str | None = None, endpoint: str | None = None, cache_dir: str | None = None) -> Model:
        """A local checkpoint or export (as ``load``), else the exported repository ``owner/name`` on the Hub."""
        s = str(name).removeprefix("hf://")
        repo_like = re.fullmatch(r"[\w.-]+/[\w.-]+", s) and not s.endswith(".ckpt") and not Path(s).exists()
        if str(name).startswith("hf://") or repo_like:
            return load(exp.download(s, revision, token, endpoint, cache_dir), device)
        return load(name, device)  # a local path (a missing one gets load's message, not a Hub error)


def load(path: str | Path, device: str | torch.device = "cpu") -> Model:
    """A model from a ``lm fit`` checkpoint (``.ckpt``), an ``lm export`` folder, or ``hf://owner/name``
    (an exported folder on the Hugging Face Hub, downloaded with ``huggingface_hub``)."""
    s = str(path)
    device = check_device(device)
    if s.startswith("hf://"):
        path = exp.download(s[len("hf://"):])
    p = checkpoint.local_path(path, "lm.load")  # file:// -> its path; other URLs refused, never fetched/unpickled
    if p.is_dir():
        module, vocab, config = exp.load_exported(p)
        meta = {k: config.get(k) for k in ("name", "data", "trained", "metrics")}
    elif p.is_file():
        from lm.tasks.pretrained import load_language_model

        module, vocab, raw = load_language_model(str(p))
        meta = exp.checkpoint_meta(raw, p)
        checkpoint.refuse_non_finite(module.net, p)
    else:
        raise CheckpointError(f"{path}: no such checkpoint or folder. Pass a .ckpt written by `lm fit` (e.g. runs/"
                              f"<name>/checkpoints/last.ckpt), a folder written by `lm export`, or hf://owner/name.")
    if vocab.size != module.net.vocab_size:
        raise CheckpointError(f"{path}: its vocabulary has {vocab.size} entries but its embedding "
                              f"{module.net.vocab_size} rows: the vocabulary (lm_vocab) belongs to another run. Use "
                              f"the checkpoint its run wrote, unmodified, or export it again.")
    return Model(module, vocab, s, meta).to(device)


__all__ = ["Model", "Score", "load"]
