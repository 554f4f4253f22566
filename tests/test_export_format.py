"""The export format of docs/export.md: its reading snippet runs on a real export with safetensors, tokenizers
and numpy alone and reproduces the model's embeddings and output log-probabilities; the tied table is stored
once; the model card carries a title, a readable layer list, Hub metadata and the run's measured metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_api import WORDS, save_ckpt, tiny

import lm
from lm.api import Model
from lm.cli import main
from lm.data.tokenizer import Vocab
from lm.export import layer_list

DOC = Path(__file__).resolve().parents[1] / "docs" / "export.md"


def doc_snippet() -> str:
    text = DOC.read_text(encoding="utf-8")
    block = text.split("<!-- tested: tests/test_export_format.py", 1)[1]
    return re.search(r"```python\n(.*?)```", block, re.S).group(1)


def test_the_documented_snippet_reads_an_export_without_lm(tmp_path):
    model = Model(tiny("softmax"), Vocab.from_words(WORDS))  # no adaptive softmax, tied weights
    folder = model.save_pretrained(tmp_path / "e")
    scope = {"folder": str(folder)}
    exec(compile(doc_snippet(), str(DOC), "exec"), scope)
    ids = [0] + model.encode("w1 w2 w3", final_newline=False)
    assert scope["ids"] == ids == [0, 2, 3, 4]
    with torch.no_grad():
        assert np.allclose(scope["inputs"], model.net.embed(torch.tensor(ids)).numpy(), atol=1e-6)
        hidden = model.net(torch.tensor([ids])).hidden[0]
        expected = model.net.log_prob(hidden).numpy()
    assert np.allclose(scope["log_probs"](hidden.numpy()), expected, atol=1e-5)


def test_tied_weights_are_stored_once(tmp_path):
    from safetensors import safe_open

    folder = Model(tiny("softmax"), Vocab.from_words(WORDS)).save_pretrained(tmp_path / "e")
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "embed.emb_layers.0.weight" in keys and "head.out_layers.0.weight" not in keys
    assert "head.out_layers.0.bias" in keys
    again = lm.load(folder)
    assert again.net.head.out_layers[0].weight is again.net.embed.emb_layers[0].weight  # the tie is restored


def test_model_card_title_layers_metadata_and_metrics(tmp_path):
    run = tmp_path / "runs" / "wt2-mixed"
    (run / "checkpoints").mkdir(parents=True)
    module = tiny("softmax")
    ckpt = save_ckpt(module, run / "checkpoints" / "last.ckpt")
    (run / "results").mkdir()
    (run / "results" / "test-segments.json").write_text(json.dumps({
        "stage": "test", "unit": "word", "metric": "ppl", "ppl": 123.456, "nll": 4.8, "tokens_scored": 2048,
        "protocol": {"protocol": "segments"}}))
    (run / "results" / "notes.json").write_text("[1, 2]")  # not a result: left out
    assert main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "e")]) == 0
    card = (tmp_path / "e" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["license"] == "cc-by-sa-3.0" and meta["datasets"] == ["Salesforce/wikitext"]
    assert meta["library_name"] == "elliptical-lm" and meta["pipeline_tag"] == "text-generation"
    title = next(line for line in card.splitlines() if line.startswith("# "))
    assert title == "# wt2-mixed: a language model with softmax attention, trained on wikitext-2"
    assert "Attention: layers 0-1 softmax." in card
    assert "| test | ppl | 123.5 | 2048 | segments | `results/test-segments.json` |" in card
    config = json.loads((tmp_path / "e" / "config.json").read_text())
    assert config["metrics"] == [{"file": "test-segments.json", "stage": "test", "metric": "ppl", "value": 123.456,
                                  "tokens": 2048, "protocol": "segments"}]
    # a save_pretrained of the loaded export keeps the record
    again = lm.load(tmp_path / "e").save_pretrained(tmp_path / "e2")
    assert json.loads((again / "config.json").read_text())["metrics"] == config["metrics"]


@pytest.mark.parametrize("names, text", [
    (["softmax", "softmax"], "layers 0-1 softmax"),
    (["softmax", "elliptical", "elliptical", "softmax"], "layer 0 softmax, layers 1-2 elliptical, layer 3 softmax"),
    (["quest"], "layer 0 quest"),
])
def test_layer_list(names, text):
    assert layer_list(names) == text


def test_gitignore_has_the_default_export_folder():
    lines = (Path(__file__).resolve().parents[1] / ".gitignore").read_text().splitlines()
    assert "exported/" in lines
