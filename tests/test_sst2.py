"""SST-2 finetuning: data, weight transfer, padding invariance, a tiny finetune, errors, the CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from lm.data.sst2 import LengthBatches, SST2DataModule, SST2Encoder, fresh_vocab, left_pad, read_tsv
from lm.data.tokenizer import EOS, UNK, Vocab
from lm.errors import CheckpointError, ConfigError, DataError
from lm.tasks.classifier import SequenceClassifier
from lm.tasks.lm_module import LanguageModel

POS = ["good", "great", "fine", "nice"]
NEG = ["bad", "awful", "poor", "dull"]
FILLER = ["the", "movie", "film", "was", "a", "plot", "and", "story", "very", "quite", "is", "it", "this"]
TINY = dict(n_layer=2, d_model=32, n_head=2, d_head=16, d_inner=64, cutoffs=[])
# Pretrained variants that must all finetune (LanguageModel keyword overrides). Elliptical runs on layers 1:
# (its layer 0 has no previous values); switch keeps FFNConfig's finite capacities (1.25 train, 2.0 eval).
VARIANTS = {
    "softmax": {},
    "elliptical": dict(attention=dict(name="elliptical", layers="1:")),
    "quest": dict(attention=dict(name="quest")),
    "switch": dict(ffn=dict(name="switch", n_experts=4)),
}


pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py: tiny models, one thread


def sentences(n: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = i % 2
        words = rng.sample(FILLER, rng.randint(1, 6))
        words.insert(rng.randint(0, len(words)), rng.choice(POS if label else NEG))
        out.append((" ".join(words), label))
    return out


def write_tsv(path: Path, rows: list[tuple[str, int]] | list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["sentence\tlabel"] + [r if isinstance(r, str) else f"{r[0]} \t{r[1]}" for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def root(tmp_path) -> Path:
    d = tmp_path / "data"
    write_tsv(d / "glue" / "SST-2" / "train.tsv", sentences(96, 0))
    write_tsv(d / "glue" / "SST-2" / "dev.tsv", sentences(32, 1))
    return d


def lm_vocab(extra: list[str] = ()) -> Vocab:
    # WikiText-like: cased words, no <pad>; "Paris" only capitalised, "don 't" spelled the WikiText way.
    return Vocab.from_words([EOS] + FILLER + POS + NEG + ["Paris", "don", "'t", "@-@", "well", "made", *extra, UNK])


def make_lm_ckpt(path: Path, vocab: Vocab | None = None, seed: int = 0, **over) -> Path:
    """A checkpoint in the format ``lm fit`` writes (state_dict, hyper_parameters, lm_vocab)."""
    vocab = vocab or lm_vocab()
    torch.manual_seed(seed)
    lm = LanguageModel(vocab_size=vocab.size, **{**TINY, **over})
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": lm.state_dict(), "hyper_parameters": dict(lm.hparams), "lm_vocab": vocab.state()}, path)
    return path


@pytest.fixture
def ckpt(tmp_path) -> Path:
    return make_lm_ckpt(tmp_path / "lm" / "checkpoints" / "last.ckpt")


def lm_state(path: Path) -> dict[str, torch.Tensor]:
    sd = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {k[len("net."):]: v for k, v in sd.items() if k.startswith("net.") and not k.startswith("net.head.")}


# ----- data -------------------------------------------------------------------------------------------
def test_read_tsv_and_malformed_rows(tmp_path):
    ok = write_tsv(tmp_path / "ok.tsv", [("a good film", 1), ("bad", 0)])
    assert read_tsv(ok) == (["a good film", "bad"], [1, 0])
    bad_cols = write_tsv(tmp_path / "cols.tsv", ["fine movie \t1", "no label here", "x \t0"])
    with pytest.raises(DataError, match=r"cols\.tsv, line 3: expected 2 tab-separated columns"):
        read_tsv(bad_cols)
    bad_label = write_tsv(tmp_path / "label.tsv", ["fine \t1", "ok \t0", "meh \t2"])
    with pytest.raises(DataError, match=r"label\.tsv, line 4: the label must be 0 or 1"):
        read_tsv(bad_label)
    bad_header = tmp_path / "header.tsv"
    bad_header.write_text("index\tsentence\n0\thello\n")
    with pytest.raises(DataError, match="line 1"):
        read_tsv(bad_header)


def test_missing_files_name_the_places_looked(tmp_path, monkeypatch):
    import lm.data.sst2_files as sst2_files

    monkeypatch.setattr(sst2_files, "resolve_roots", lambda root: [Path(root)])
    dm = SST2DataModule(root=str(tmp_path / "empty"), source="local", vocab="fresh")
    with pytest.raises(DataError, match=r"(?s)SST-2 was not found.*glue/SST-2/train.tsv.*empty"):
        dm.files


def test_hub_offline_is_a_data_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    # `huggingface_hub` reads the offline flag once, at import: in the suite another test has imported it
    # already, and without this it would try the network (a fresh `lm` process, which is what a user runs,
    # reads the environment above).
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    dm = SST2DataModule(root=str(tmp_path / "data"), source="download", vocab="fresh")
    with pytest.raises(DataError, match="(?s)SST-2 is not on this machine and could not be downloaded.*nyu-mll/glue"):
        dm.files


def test_reuse_vocab_fallbacks_and_unknown_rate():
    v = lm_vocab()
    enc = SST2Encoder(v, "reuse", add_eos=True)
    ids, info = enc.encode(["i do n't like paris", "a well-made film"])
    toks = [[v.id_to_token(i) for i in x] for x in ids]
    assert toks[0] == [UNK, "don", "'t", UNK, "Paris", EOS]  # i, like unknown; n't re-spelled; Paris cased
    assert toks[1] == ["a", "well", "@-@", "made", "film", EOS]
    assert info["unk"] == 2 and info["case_fallback"] == 1 and info["respelled"] == 2
    assert info["unk_rate"] == pytest.approx(2 / 10)  # over the word tokens fed to the model
    byte_ids, byte_info = SST2Encoder(Vocab.byte_level(), "reuse").encode(["héllo"])
    assert byte_ids[0][:-1] == list("héllo".encode()) and byte_info["unk_rate"] == 0.0


def test_fresh_vocab_is_lowercased_with_pad():
    v = fresh_vocab(["The good Film", "the bad film"])
    assert v.token_to_id("<pad>") == 0 and v.token_to_id("the") is not None and v.token_to_id("The") is None
    enc = SST2Encoder(v, "fresh")
    assert enc.pad_id == 0
    ids, info = enc.encode(["THE unseen film"])
    assert [v.id_to_token(i) for i in ids[0]] == ["the", UNK, "film", EOS] and info["unk"] == 1


def test_left_padding_puts_real_last_token_last():
    batch = left_pad([([5, 6, 7], 1), ([8], 0), ([9, 10], 1)], pad_id=0)
    assert batch["input"].tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 10]]
    assert batch["n_pad"].tolist() == [0, 2, 1] and batch["label"].tolist() == [1, 0, 1]


def test_length_batches_have_no_padding_and_cover_everything():
    lengths = [random.Random(i).randint(1, 6) for i in range(101)]
    s = LengthBatches(lengths, 8, "length", shuffle=True, seed=3)
    batches = list(s)
    assert sorted(i for b in batches for i in b) == list(range(101))
    assert all(len({lengths[i] for i in b}) == 1 and len(b) <= 8 for b in batches)
    s.set_epoch(1)
    assert list(s) != batches  # reshuffled per epoch
    ranks = [LengthBatches(lengths, 8, "pad", True, 0, r, 2).batches() for r in range(2)]
    assert len(ranks[0]) == len(ranks[1])


def test_truncation_keeps_the_end(root, ckpt):
    dm = SST2DataModule(root=str(root), pretrained=str(ckpt), max_len=3)
    ids, _ = dm.encoded("train")
    assert max(len(x) for x in ids) == 3 and all(x[-1] == dm.vocabulary.eos_id for x in ids)


def test_byte_level_checkpoint_reads_utf8_bytes(tmp_path, root):
    vocab = Vocab.byte_level()
    torch.manual_seed(0)
    lm = LanguageModel(vocab_size=256, unit="byte", **TINY)
    path = tmp_path / "bytes.ckpt"
    torch.save({"state_dict": lm.state_dict(), "hyper_parameters": dict(lm.hparams), "lm_vocab": vocab.state()}, path)
    dm = SST2DataModule(root=str(root), pretrained=str(path))
    ids, _ = dm.encoded("dev")
    assert dm.unit == "byte" and dm.vocab_size == 256 and dm.stats["dev"]["unk_rate"] == 0.0
    assert bytes(ids[0][:-1]).decode() == dm.raw("dev")[0][0] and ids[0][-1] == 10
    model = SequenceClassifier(pretrained=str(path), vocab_size=dm.vocab_size)
    batch = next(iter(dm.val_dataloader()))
    assert model(batch["input"], batch["n_pad"]).shape == (batch["input"].size(0), 2)


# ----- weight transfer --------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_reuse_transfers_blocks_and_embeddings(tmp_path, variant):
    ckpt = make_lm_ckpt(tmp_path / f"{variant}.ckpt", **VARIANTS[variant])
    src = lm_state(ckpt)
    model = SequenceClassifier(pretrained=str(ckpt), vocab="reuse")
    dst = model.net.state_dict()
    assert set(dst) == set(src)
    for k in src:
        assert torch.equal(dst[k], src[k]), k
    assert any(k.startswith("embed.") for k in dst)
    attn = [type(b.attn).__name__ for b in model.net.layers]
    assert attn == {"elliptical": ["SoftmaxAttention", "EllipticalAttention"],
                    "quest": ["QuestAttention"] * 2}.get(variant, ["SoftmaxAttention"] * 2)
    assert all(type(b.ffn).__name__ == ("MoEFFN" if variant == "switch" else "DenseFFN") for b in model.net.layers)
    if variant == "switch":
        assert any(".ffn.w1" in k for k in src)
    # One training step on a left-padded batch: finite loss, a gradient for every trainable tensor.
    model.train()
    batch = left_pad([([3, 4, 5, 6], 1), ([7, 8], 0), ([9], 1)], 0)
    _, loss = model._step(batch)
    aux = model.net.aux_loss()
    assert (aux is not None) == (variant == "switch")
    (loss if aux is None else loss + aux).backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.net.layers[1].attn.qkv.weight.grad.abs().sum() > 0


def test_fresh_transfers_blocks_only(ckpt, root):
    dm = SST2DataModule(root=str(root), pretrained=str(ckpt), vocab="fresh")
    src = lm_state(ckpt)
    model = SequenceClassifier(pretrained=str(ckpt), vocab="fresh", vocab_size=dm.vocab_size)
    dst = model.net.state_dict()
    blocks = [k for k in src if not k.startswith("embed.")]
    assert blocks and all(k.startswith(("layers.", "final_norm")) for k in blocks)
    for k in blocks:
        assert torch.equal(dst[k], src[k]), k
    assert model.net.embed.emb_layers[0].weight.shape[0] == dm.vocab_size != lm_vocab().size
    assert model.transfer["new"] == ["embed"]


def test_load_weights_false_is_a_random_start(ckpt):
    src = lm_state(ckpt)
    model = SequenceClassifier(pretrained=str(ckpt), load_weights=False)
    dst = model.net.state_dict()
    assert not torch.equal(dst["layers.0.attn.qkv.weight"], src["layers.0.attn.qkv.weight"])


def test_from_scratch_needs_fresh_vocab():
    with pytest.raises(ConfigError, match="fresh"):
        SequenceClassifier(pretrained=None, vocab="reuse", vocab_size=10, model=TINY)
    m = SequenceClassifier(pretrained=None, vocab="fresh", vocab_size=10, model=TINY)
    assert m.net.cfg.n_layer == 2


# ----- padding ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("pos", ["absolute", "relative"])
def test_masked_forward_equals_plain_forward_without_padding(tmp_path, pos):
    path = make_lm_ckpt(tmp_path / f"{pos}.ckpt", pos=pos)
    model = SequenceClassifier(pretrained=str(path)).eval()
    x = torch.randint(0, lm_vocab().size, (3, 7))
    with torch.no_grad():
        plain = model.net(x).hidden
        masked = model.net(x, key_mask=torch.ones(3, 7, dtype=torch.bool)).hidden
        assert torch.equal(model.hidden(x, torch.zeros(3, dtype=torch.long)), plain)
    torch.testing.assert_close(masked, plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["softmax", "elliptical", "quest", "switch"])
@pytest.mark.parametrize("pos", ["absolute", "relative"])
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_padding_does_not_change_the_prediction(tmp_path, pos, pooling, variant):
    # MoE: dropless (a finite capacity makes predictions batch-dependent: see test_moe_capacity_*);
    # Elliptical: see also test_elliptical_metric_ignores_padding (larger weights, both estimators).
    path = make_lm_ckpt(tmp_path / f"{pos}.ckpt", pos=pos, **VARIANTS[variant])
    model = SequenceClassifier(pretrained=str(path), pooling=pooling, dropless_moe=variant == "switch").eval()
    V = lm_vocab().size
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, V, (n,), generator=g).tolist() for n in (5, 2, 8)]
    with torch.no_grad():
        alone = torch.cat([model(torch.tensor([s])) for s in seqs])
        for pad_id in (0, 3):
            batch = left_pad([(s, 0) for s in seqs], pad_id)
            padded = model(batch["input"], batch["n_pad"])
            torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-4)
        # More padding than needed, different pad ids per call: still the same logits.
        extra = left_pad([(s, 0) for s in seqs] + [([1] * 12, 0)], 4)
        torch.testing.assert_close(model(extra["input"], extra["n_pad"])[:3], alone, atol=1e-5, rtol=1e-4)
    # last pooling reads the final position, i.e. the real last token of every left-padded row
    if pooling == "last":
        with torch.no_grad():
            h = model.hidden(batch["input"], batch["n_pad"])
            torch.testing.assert_close(model.head(h[:, -1]), padded)
            for r, s in enumerate(seqs):
                assert batch["input"][r, -1].item() == s[-1]


def test_moe_capacity_warns_and_pads_are_not_routed(tmp_path, caplog):
    # eval capacity ceil(0.5 * N / 4): tokens are certainly dropped, and capacity is counted over real tokens only.
    path = make_lm_ckpt(tmp_path / "switch.ckpt", ffn=dict(name="switch", n_experts=4, eval_capacity_factor=0.5))
    with caplog.at_level("WARNING", logger="lm.tasks.classifier"):
        model = SequenceClassifier(pretrained=str(path)).eval()
    assert "finite capacity" in caplog.text and "dropless_moe" in caplog.text
    seqs = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12]]
    batch = left_pad([(s, 0) for s in seqs], 0)
    more = {"input": torch.cat([torch.full((3, 4), 2), batch["input"]], 1), "n_pad": batch["n_pad"] + 4}
    moe = model.net.layers[0].ffn
    with torch.no_grad():
        logits = model(batch["input"], batch["n_pad"])
        assert moe.stats["dropped_fraction"] > 0
        assert moe.stats["expert_load"].sum() == pytest.approx(1.0)
        torch.testing.assert_close(model(more["input"], more["n_pad"]), logits, atol=1e-6, rtol=1e-5)
    caplog.clear()
    with caplog.at_level("WARNING", logger="lm.tasks.classifier"):
        dropless = SequenceClassifier(pretrained=str(path), dropless_moe=True)
    assert caplog.text == "" and all(b.ffn.capacity_factor is None is b.ffn.eval_capacity_factor
                                     for b in dropless.net.layers)


@pytest.mark.parametrize("estimator", ["segment_mean", "causal"])
def test_elliptical_metric_ignores_padding(tmp_path, monkeypatch, estimator):
    # Elliptical's m̂ is a per-sequence statistic over positions: with left padding it is taken over the
    # real tokens only (AttnContext.key_mask), so a padded sentence gets exactly its own prediction.
    att = dict(name="elliptical", layers="1:", options={"estimator": estimator})
    path = make_lm_ckpt(tmp_path / "elliptical.ckpt", init_std=0.2, attention=att)  # visible effects
    model = SequenceClassifier(pretrained=str(path)).eval()
    seqs = [[3, 4, 5, 6, 9, 2], [7, 8], [11, 12, 13]]
    batch = left_pad([(s, 0) for s in seqs], 0)
    with torch.no_grad():
        alone = torch.cat([model(torch.tensor([s])) for s in seqs])
        torch.testing.assert_close(model(batch["input"], batch["n_pad"]), alone, atol=1e-5, rtol=1e-4)
    # The control: the same forward with pads counted in the statistic gives other predictions.
    import lm.model.transformer as tr

    real_ctx = tr.AttnContext
    monkeypatch.setattr(tr, "AttnContext", lambda **kw: real_ctx(**{**kw, "key_mask": None}))
    with torch.no_grad():
        counted = model(batch["input"], batch["n_pad"])
    assert not torch.allclose(counted[1:], alone[1:], atol=1e-5)
    torch.testing.assert_close(counted[0], alone[0], atol=1e-5, rtol=1e-4)  # the unpadded row is unaffected


def test_unmasked_padding_is_visible(ckpt):
    # The control: without the mask, pads are context and shift absolute positions.
    model = SequenceClassifier(pretrained=str(ckpt), mask_padding=False).eval()
    seqs = [[1, 2, 3], [4]]
    batch = left_pad([(s, 0) for s in seqs], 0)
    with torch.no_grad():
        alone = model(torch.tensor([seqs[1]]))
        padded = model(batch["input"], batch["n_pad"])[1:]
    assert not torch.allclose(alone, padded, atol=1e-5)


# ----- training ---------------------------------------------------------------------------------------
def _trainer(tmp_path, **kw):
    import lightning as L

    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path / "run"),
                     num_sanity_val_steps=0, **kw)


@pytest.mark.parametrize("vocab,batching", [("reuse", "length"), ("fresh", "pad")])
def test_tiny_finetune_separates_good_from_bad(tmp_path, root, ckpt, vocab, batching):
    torch.manual_seed(0)
    dm = SST2DataModule(root=str(root), pretrained=str(ckpt), vocab=vocab, batch_size=16, batching=batching)
    model = SequenceClassifier(pretrained=str(ckpt), vocab=vocab, vocab_size=dm.vocab_size, lr=3e-3,
                               head_dropout=0.0, dropout=0.0)
    trainer = _trainer(tmp_path, max_epochs=12)
    trainer.fit(model, datamodule=dm)
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in dm.train_dataloader():
            correct += (model(batch["input"], batch["n_pad"]).argmax(-1) == batch["label"]).sum().item()
            total += batch["label"].numel()
    assert total == 96 and correct == total
    result = json.loads((tmp_path / "run" / "results" / "sst2-dev.json").read_text())
    assert result["dev_acc"] >= 0.9 and result["vocab_mode"] == vocab and result["pretrained"] == str(ckpt)
    assert "unk_rate" in result and set(result["unk_rate"]) == {"train", "dev"}
    assert len(result["history"]) == 12


# ----- checkpoint errors ------------------------------------------------------------------------------
def test_mismatching_pretrained_checkpoint_lists_problems(tmp_path, ckpt):
    raw = torch.load(ckpt, weights_only=True)
    del raw["state_dict"]["net.layers.0.attn.qkv.weight"]
    raw["state_dict"]["net.layers.1.norm1.weight"] = torch.zeros(3)
    bad = tmp_path / "bad.ckpt"
    torch.save(raw, bad)
    with pytest.raises(CheckpointError) as e:
        SequenceClassifier(pretrained=str(bad))
    assert "layers.0.attn.qkv.weight" in str(e.value) and "layers.1.norm1.weight" in str(e.value)


def test_vocab_of_another_checkpoint_is_refused(tmp_path, ckpt):
    with pytest.raises(CheckpointError, match="vocabulary"):
        SequenceClassifier(pretrained=str(ckpt), vocab="reuse", vocab_size=lm_vocab().size + 5)


def test_finetuned_checkpoint_that_does_not_fit(tmp_path, root, ckpt):
    dm = SST2DataModule(root=str(root), pretrained=str(ckpt), limit_train=16, batch_size=16)
    model = SequenceClassifier(pretrained=str(ckpt))
    trainer = _trainer(tmp_path, max_epochs=1)
    trainer.fit(model, datamodule=dm)
    good = tmp_path / "clf.ckpt"
    trainer.save_checkpoint(good)
    # The same vocabulary and architecture: loads; a classifier over another checkpoint: refused, listing.
    _trainer(tmp_path).validate(SequenceClassifier(pretrained=str(ckpt)), datamodule=dm, ckpt_path=str(good))
    other = make_lm_ckpt(tmp_path / "other.ckpt", vocab=lm_vocab(["extra", "words"]), d_inner=48)
    dm2 = SST2DataModule(root=str(root), pretrained=str(other))
    with pytest.raises(CheckpointError) as e:
        _trainer(tmp_path).validate(SequenceClassifier(pretrained=str(other)), datamodule=dm2, ckpt_path=str(good))
    msg = str(e.value)
    assert "vocabulary" in msg and "shape mismatches" in msg and "embed.emb_layers.0.weight" in msg
    assert "ffn" in msg


# ----- the command line -------------------------------------------------------------------------------
def test_cli_fit_then_validate(tmp_path, root, ckpt, monkeypatch):
    from lm.cli import main

    monkeypatch.chdir(tmp_path)
    cfg = Path(__file__).resolve().parents[1] / "configs" / "sst2" / "finetune.yaml"
    run = tmp_path / "runs" / "sst2-test"
    common = ["--config", str(cfg), "--data.root", str(root), "--trainer.default_root_dir", str(run)]
    fit = ["finetune", "fit", *common, "--model.pretrained", str(ckpt), "--trainer.max_epochs", "1",
           "--trainer.enable_progress_bar", "false"]
    assert main(fit) == 0
    result = json.loads((run / "results" / "sst2-dev.json").read_text())
    assert 0.0 <= result["dev_acc"] <= 1.0 and result["vocab_mode"] == "reuse"
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_file() and len(list((run / "checkpoints").glob("*.ckpt"))) == 2
    assert (run / "config.yaml").is_file() and list(run.glob("lightning_logs/version_0/events.out.tfevents*"))
    val = ["finetune", "validate", "--config", str(run / "config.yaml"), "--ckpt_path", str(last)]
    assert main(val) == 0
    again = json.loads((run / "results" / "sst2-dev-validate.json").read_text())
    assert again["checkpoint"] == str(last) and again["dev_acc"] == pytest.approx(result["dev_acc"])
    # A missing pretrained checkpoint is a one-paragraph error, exit code 2.
    assert main(["finetune", "fit", *common, "--model.pretrained", str(tmp_path / "nope.ckpt")]) == 2
