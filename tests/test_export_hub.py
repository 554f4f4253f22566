"""Push to and pull from the Hugging Face Hub through ``huggingface_hub``'s own client, against a local stand-in:
``tests/hub_server.py``'s HubServer on 127.0.0.1, started inside the test (the few endpoints create_repo,
upload_folder and snapshot_download use). Nothing here reaches the internet."""

from __future__ import annotations

import pytest
from hub_server import HubServer
from test_api import TEXT, WORDS, save_ckpt, tiny

import lm
from lm.api import Model
from lm.cli import main
from lm.data.tokenizer import Vocab
from lm.errors import CheckpointError


@pytest.fixture
def hub(monkeypatch, tmp_path):
    import huggingface_hub.constants as c

    with HubServer() as server:  # shut down and its socket closed (server_close) when the test ends
        url = server.url

        # The client reads these at import; a test elsewhere in the suite may have set the offline flags.
        monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(c, "ENDPOINT", url)
        monkeypatch.setattr(c, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_the_local_stand_in")
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
        monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
        yield server


def test_push_and_pull_round_trip(hub, tmp_path):
    model = Model(tiny("elliptical", "relative", estimator="causal"), Vocab.from_words(WORDS))
    url = model.push_to_hub("alice/tiny", endpoint=hub.url)
    files = hub.repos["alice/tiny"]["files"]
    assert sorted(files) == ["README.md", "config.json", "model.safetensors", "tokenizer.json"]
    assert url.startswith(hub.url)
    again = Model.from_pretrained("alice/tiny", endpoint=hub.url, cache_dir=str(tmp_path / "cache"))
    assert again.score(TEXT).token_nll == model.score(TEXT).token_nll
    # lm.load("hf://...") goes through the same download (the client's configured endpoint)
    assert lm.load("hf://alice/tiny").score(TEXT).token_nll == model.score(TEXT).token_nll


def test_export_push_to_from_the_cli(hub, tmp_path, capsys):
    ckpt = save_ckpt(tiny("softmax"), tmp_path / "m.ckpt")
    assert main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "e"), "--push_to", "bob/m"]) == 0
    assert "uploaded to bob/m" in capsys.readouterr().out
    uploaded = hub.repos["bob/m"]["files"]
    assert uploaded["model.safetensors"] == (tmp_path / "e" / "model.safetensors").read_bytes()


def test_hub_failures_are_one_paragraph_without_huggingface_cli(hub, tmp_path):
    with pytest.raises(CheckpointError) as e:
        Model.from_pretrained("nobody/missing", endpoint=hub.url, cache_dir=str(tmp_path / "c"))
    assert "hf download nobody/missing" in str(e.value) and "huggingface-cli" not in str(e.value)
    with pytest.raises(CheckpointError, match="no such checkpoint or folder"):  # a mistyped local path
        Model.from_pretrained(str(tmp_path / "runs" / "last.ckpt"))
    model = Model(tiny("softmax"), Vocab.from_words(WORDS))
    with pytest.raises(CheckpointError) as e:  # a server that is not there
        model.push_to_hub("alice/x", endpoint="http://127.0.0.1:9")
    assert "hf auth login" in str(e.value) and "push_to_hub('alice/x')" in str(e.value)
    assert "huggingface-cli" not in str(e.value)


def test_the_package_root_exposes_the_model_class():
    assert lm.Model is Model and lm.Model.from_pretrained.__func__ is Model.from_pretrained.__func__
