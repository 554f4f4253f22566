"""The paper's SST-2 protocol (configs/sst2/paper.yaml, docs/sst2.md): each piece against a hand-built
expectation or a naive re-computation, transcribed from the authors' finetuning code."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from lm.data.sst2 import SST2DataModule, read_tsv
from lm.data.sst2_protocol import CLS, SEP, counted_words, drop_partial
from lm.errors import ConfigError
from test_sst2 import make_lm_ckpt, root, write_tsv  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("single_thread")  # tests/conftest.py

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "configs" / "sst2" / "paper.yaml"
REAL = REPO.parent / "shared" / "data" / "glue" / "SST-2"  # ../shared/data beside the checkout (CI too)
PAPER_DATA = dict(vocab="fresh", cls_framing=True, add_eos=False, vocab_count="train+dev", batching="pad",
                  shuffle=False, drop_last=True)


@pytest.fixture
def tiny(tmp_path) -> Path:
    d = tmp_path / "tiny"
    write_tsv(d / "glue" / "SST-2" / "train.tsv", [("A b a", 1), ("c", 0), ("B a c", 1)])
    write_tsv(d / "glue" / "SST-2" / "dev.tsv", [("b D", 0), ("e", 1), ("A", 0)])
    return d


# ----- vocabulary ---------------------------------------------------------------------------------------
def test_vocab_is_lowercased_and_counted_on_train_and_dev(tiny):
    # By hand, framed and lower-cased: train <CLS> a b a <S> | <CLS> c <S> | <CLS> b a c <S>, dev <CLS> b d <S> |
    # <CLS> e <S> | <CLS> a <S>. Counts: <CLS> 6, <S> 6, a 4, b 3, c 2, d 1, e 1; ties in first-seen order.
    dm = SST2DataModule(root=str(tiny), batch_size=2, **PAPER_DATA)
    v = dm.vocabulary
    assert [v.id_to_token(i) for i in range(v.size)] == ["<pad>", "<eos>", "<unk>", CLS, SEP, "a", "b", "c", "d", "e"]
    # Counted on train only (the project's fresh default): <CLS> 3, a 3, <S> 3, b 2, c 2 (a seen before <S>),
    # and the dev-only words are unknown.
    only_train = SST2DataModule(root=str(tiny), batch_size=2, **{**PAPER_DATA, "vocab_count": "train"})
    w = only_train.vocabulary
    assert [w.id_to_token(i) for i in range(w.size)] == ["<pad>", "<eos>", "<unk>", CLS, "a", SEP, "b", "c"]
    ids, _ = only_train.encoded("dev")
    assert ids[0] == [3, 6, 2, 5] and only_train.stats["dev"]["unk"] == 2  # d and e; <CLS>/<S> are not counted as words
    assert counted_words(["X y", "x"]) == ["x", "y"] and counted_words(["x y"], cls_framing=True)[0] == CLS


# ----- framing and padding of a hand-written batch --------------------------------------------------------
def test_framing_and_left_padding_of_a_batch(tiny):
    dm = SST2DataModule(root=str(tiny), batch_size=2, **PAPER_DATA)
    dm.setup("fit")
    # ids: <pad> 0, <CLS> 3, <S> 4, a 5, b 6, c 7, d 8, e 9. File order, left padding with 0, last partial dropped.
    train = list(dm.train_dataloader())
    assert len(train) == 1
    assert train[0]["input"].tolist() == [[3, 5, 6, 5, 4], [0, 0, 3, 7, 4]]
    assert train[0]["n_pad"].tolist() == [0, 2] and train[0]["label"].tolist() == [1, 0]
    dev = list(dm.val_dataloader())
    assert [b["input"].tolist() for b in dev] == [[[3, 6, 8, 4], [0, 3, 9, 4]]]
    for b in train + dev:  # <CLS> right after the pads, <S> last: the position the classifier reads
        x, n_pad = b["input"], b["n_pad"]
        assert (x[torch.arange(len(x)), n_pad] == 3).all() and (x[:, -1] == 4).all()
        assert all((row[:k] == 0).all() for row, k in zip(x, n_pad.tolist()))
    dm.train_dataloader().batch_sampler.set_epoch(3)  # file order: the same batches every epoch
    assert [b["input"].tolist() for b in dm.train_dataloader()] == [train[0]["input"].tolist()]
    assert dm.describe()["scored"] == {"train": 2, "dev": 2}


def test_drop_partial():
    assert drop_partial([[0, 1], [2, 3], [4]], 2) == [[0, 1], [2, 3]]
    assert drop_partial([[0, 1]], 3) == []


@pytest.mark.skipif(not (REAL / "dev.tsv").is_file(), reason="the GLUE SST-2 files are not under ../shared/data")
def test_real_dev_file_scores_864_of_872_in_file_order():
    dm = SST2DataModule(root=str(REAL.parents[1]), batch_size=16, eval_batch_size=16, **PAPER_DATA)
    sentences, labels = read_tsv(REAL / "dev.tsv")
    assert len(sentences) == 872
    batches = list(dm.val_dataloader())
    assert len(batches) == 54 and sum(len(b["label"]) for b in batches) == 864
    assert torch.cat([b["label"] for b in batches]).tolist() == labels[:864]
    assert dm.describe()["scored"]["dev"] == 864
    # The vocabulary against the authors' reading (csv, lower(), split()): every train+dev token, no unknowns.
    words = set()
    for split in ("train", "dev"):
        with open(REAL / f"{split}.tsv", encoding="utf-8") as f:
            for row in csv.reader(f, delimiter="\t"):
                if row[1] in ("0", "1"):
                    words.update(row[0].strip().lower().split())
    assert dm.vocab_size == len(words) + 2 + 3  # + <CLS>, <S> + <pad>, <eos>, <unk>
    assert dm.stats["dev"]["unk"] == 0
    n_train = len(dm.encoded("train")[0])
    assert n_train == 67349 and len(dm.train_dataloader()) == n_train // 16 == 4209


# ----- validation of the options -----------------------------------------------------------------------
@pytest.mark.parametrize("over,match", [
    (dict(vocab_count="dev"), "data.vocab_count"),
    (dict(vocab="reuse", pretrained="x.ckpt"), "model.vocab: fresh"),
    (dict(vocab="reuse", pretrained="x.ckpt", cls_framing=False), "vocab_count: train\\+dev"),
    (dict(add_eos=True), "add_eos: false"),
    (dict(batching="length"), "batching: pad"),
])
def test_incompatible_options_fail_at_construction(over, match):
    with pytest.raises(ConfigError, match=match):
        SST2DataModule(**{**PAPER_DATA, **over})


# ----- the head ------------------------------------------------------------------------------------------
def test_pre_head_and_head_against_a_naive_recomputation(tmp_path):
    from lm.data.sst2 import left_pad
    from lm.tasks.classifier import SequenceClassifier
    from lm.tasks.sst2_head import LogSoftmaxProjection

    ckpt = make_lm_ckpt(tmp_path / "lm.ckpt")
    model = SequenceClassifier(pretrained=str(ckpt), vocab="fresh", vocab_size=12, pre_head="log_softmax",
                               mask_padding=False).eval()
    d = model.net.cfg.d_model
    assert isinstance(model.pre_head, LogSoftmaxProjection) and model.pre_head.proj.weight.shape == (d, d)
    assert [type(m).__name__ for m in model.head] == ["Linear", "Tanh", "Dropout", "Linear"]
    assert model.head[0].weight.shape == (d, d) and model.head[3].weight.shape == (2, d) and model.head[2].p == 0.1
    batch = left_pad([([3, 5, 6, 4], 1), ([3, 7, 4], 0)], 0)
    with torch.no_grad():
        logits = model(batch["input"], batch["n_pad"])
        h = model.hidden(batch["input"], batch["n_pad"])
        alone = model(torch.tensor([[3, 7, 4]]))
    p = {k: v.double() for k, v in model.state_dict().items() if k.startswith(("pre_head.", "head."))}
    for r in range(2):
        z = p["pre_head.proj.weight"] @ h[r, -1].double() + p["pre_head.proj.bias"]
        ls = z - torch.log(torch.exp(z).sum())
        assert (ls < 0).all()
        a = torch.tanh(p["head.0.weight"] @ ls + p["head.0.bias"])
        torch.testing.assert_close(logits[r].double(), p["head.3.weight"] @ a + p["head.3.bias"], rtol=1e-5, atol=1e-6)
    # Pads attended (mask_padding: false): the padded sentence is read differently from the sentence alone.
    assert not torch.allclose(logits[1], alone[0], atol=1e-5)
    with pytest.raises(ConfigError, match="model.pre_head"):
        SequenceClassifier(pretrained=str(ckpt), vocab="fresh", vocab_size=12, pre_head="softmax")


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
def test_moe_aux_loss_option(tmp_path):
    from lm.data.sst2 import left_pad
    from lm.tasks.classifier import SequenceClassifier

    ckpt = make_lm_ckpt(tmp_path / "switch.ckpt", ffn=dict(name="switch", n_experts=4))
    batch = left_pad([([3, 4, 5], 1), ([6, 7], 0)], 0)
    losses = {}
    for on in (True, False):
        torch.manual_seed(0)
        model = SequenceClassifier(pretrained=str(ckpt), dropless_moe=True, moe_aux_loss=on, dropout=0.0,
                                   head_dropout=0.0)
        total = model.training_step(batch, 0)
        _, ce = model._step(batch)
        losses[on] = (float(total), float(ce), float(model.net.aux_loss()))
    on, off = losses[True], losses[False]
    assert off[0] == pytest.approx(off[1])  # the paper: cross-entropy only
    assert on[2] > 0 and on[0] == pytest.approx(on[1] + on[2])


# ----- the recipe: options, constant lr, best checkpoint, a smoke run --------------------------------------
@pytest.fixture
def small(tmp_path) -> Path:
    from test_sst2 import sentences

    d = tmp_path / "small"
    write_tsv(d / "glue" / "SST-2" / "train.tsv", sentences(168, 0))  # 10 batches of 16, 8 dropped
    write_tsv(d / "glue" / "SST-2" / "dev.tsv", sentences(21, 1))  # 1 batch of 16, 5 dropped
    return d


def test_paper_yaml_selects_every_piece_and_keeps_lr_constant(tmp_path, small):
    import lightning as L

    from lm.cli import finetune_cli

    ckpt = make_lm_ckpt(tmp_path / "lm.ckpt")
    cli = finetune_cli(["--config", str(PAPER), "--data.root", str(small), "--model.pretrained", str(ckpt),
                        "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.enable_progress_bar",
                        "false"], run=False)
    m, dm, t = cli.model, cli.datamodule, cli.trainer
    assert (m.vocab_mode, m.pooling, m.mask_padding, type(m.pre_head).__name__, m.moe_aux_loss) == \
        ("fresh", "last", False, "LogSoftmaxProjection", False)
    assert m.head[2].p == 0.1 and all(x.p == 0.1 for x in m.net.modules() if isinstance(x, torch.nn.Dropout))
    assert (dm.cls_framing, dm.add_eos, dm.vocab_count, dm.batching, dm.shuffle, dm.drop_last) == \
        (True, False, "train+dev", "pad", False, True)
    assert dm.batch_size == dm.eval_batch_size == 16
    assert t.max_epochs == 5 and t.gradient_clip_val is None and t.val_check_interval == 1.0
    ckpt_cb = t.checkpoint_callback
    assert (ckpt_cb.monitor, ckpt_cb.mode, ckpt_cb.save_top_k) == ("val/loss", "min", 1)
    opt = m.configure_optimizers()
    assert isinstance(opt, torch.optim.Adam)  # no scheduler
    assert opt.defaults["lr"] == 1e-4 and opt.defaults["weight_decay"] == 0 and opt.defaults["betas"] == (0.9, 0.999)

    class LrSeen(L.Callback):
        def __init__(self):
            self.lrs = []

        def on_train_batch_start(self, trainer, *args):
            self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    seen = LrSeen()
    t.callbacks.append(seen)
    t.fit_loop.max_epochs = 2
    t.fit(m, datamodule=dm)
    assert seen.lrs == [1e-4] * 20  # 2 epochs x 10 full batches of 16: constant, no warm-up, no decay


def test_paper_recipe_smoke_run_picks_the_best_dev_loss(tmp_path, small, monkeypatch):
    from lm.cli import main

    monkeypatch.chdir(tmp_path)
    ckpt = make_lm_ckpt(tmp_path / "lm.ckpt")
    run = tmp_path / "runs" / "paper"
    # Dev labels flipped: the better the model learns train, the worse its dev loss, so the epoch with the
    # lowest dev loss is not the last one and the selection is visible.
    flipped = [(s, 1 - y) for s, y in zip(*read_tsv(small / "glue" / "SST-2" / "dev.tsv"))]
    write_tsv(small / "glue" / "SST-2" / "dev.tsv", flipped)
    assert main(["finetune", "fit", "--config", str(PAPER), "--data.root", str(small), "--model.pretrained",
                 str(ckpt), "--trainer.default_root_dir", str(run), "--trainer.max_epochs", "4",
                 "--model.lr", "3e-3", "--trainer.enable_progress_bar", "false"]) == 0
    result = json.loads((run / "results" / "sst2-dev.json").read_text())
    hist = result["history"]
    assert len(hist) == 4 and all(e["dev_scored"] == 16 for e in hist)
    assert result["data"]["scored"] == {"train": 160, "dev": 16} and result["data"]["vocab_count"] == "train+dev"
    best = min(hist, key=lambda e: e["dev_loss"])
    assert best["epoch"] != hist[-1]["epoch"]
    assert result["best_by_dev_loss"] == best
    best_files = [p for p in (run / "checkpoints").glob("*.ckpt") if p.name != "last.ckpt"]
    assert len(best_files) == 1
    saved = torch.load(best_files[0], map_location="cpu", weights_only=True)
    assert saved["epoch"] == best["epoch"] and saved["sst2_history"][-1]["dev_loss"] == best["dev_loss"]
    # Validating the selected checkpoint scores the same 16 sentences with the same loss and accuracy.
    assert main(["finetune", "validate", "--config", str(run / "config.yaml"), "--ckpt_path", str(best_files[0])]) == 0
    again = json.loads((run / "results" / "sst2-dev-validate.json").read_text())
    assert again["dev_scored"] == 16 and again["dev_acc"] == pytest.approx(best["dev_acc"])
    assert again["dev_loss"] == pytest.approx(best["dev_loss"], rel=1e-5)
