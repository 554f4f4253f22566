"""lm/tasks/lightning_compat.py against the Lightning it runs on.

The package reproduces, from public state, rules Lightning keeps private. These tests compare each
reproduction with Lightning's private implementation on a real (tiny) training run, so a Lightning
release that changes a rule fails here, naming the installed version, instead of silently changing
what the package logs."""

from __future__ import annotations

import configparser
from pathlib import Path

import lightning as L
import pytest
import torch
from packaging.specifiers import SpecifierSet

from lm.tasks.lightning_compat import TESTED_LIGHTNING, attached_trainer, logger_writes_now

ROOT = Path(__file__).resolve().parents[1]


def test_installed_lightning_is_in_the_tested_range_pinned_in_setup_cfg():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    pins = [r.strip() for r in cfg["options"]["install_requires"].splitlines() if r.strip().startswith("lightning")]
    assert pins == [f"lightning{TESTED_LIGHTNING}"], pins
    assert L.__version__ in SpecifierSet(TESTED_LIGHTNING), (
        f"lightning {L.__version__} is outside the tested range {TESTED_LIGHTNING}: run "
        f"tests/test_lightning_compat.py, then widen TESTED_LIGHTNING and setup.cfg together.")


class Probe(L.LightningModule):
    """Records, at every training step, our predicate and Lightning's private one."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))
        self.seen: list[tuple[int, bool, bool]] = []

    def training_step(self, batch, batch_idx):
        private = self.trainer._logger_connector.should_update_logs  # Lightning's own rule
        self.seen.append((self.trainer.global_step, logger_writes_now(self.trainer), bool(private)))
        return (self.w * batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(7, 1)), batch_size=1)


@pytest.mark.parametrize("every,max_steps,epochs", [(1, 4, 1), (3, 10, 2), (4, 6, 1), (0, 3, 1)])
def test_logger_writes_now_is_lightnings_predicate(tmp_path, every, max_steps, epochs):
    probe = Probe()
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=max_steps, max_epochs=epochs, log_every_n_steps=every,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(probe)
    assert len(probe.seen) == max_steps
    mismatch = [(s, ours, theirs) for s, ours, theirs in probe.seen if ours != theirs]
    assert not mismatch, (
        f"lightning {L.__version__} changed when the logger writes (step, ours, Lightning's): {mismatch}. "
        f"Update lm/tasks/lightning_compat.logger_writes_now.")
    if every:  # the expectation itself, independent of both: steps s with (s + 1) % every == 0
        assert [s for s, ours, _ in probe.seen if ours] == [s for s in range(max_steps) if (s + 1) % every == 0]


def test_attached_trainer_is_none_for_a_module_on_its_own_and_the_trainer_once_attached(tmp_path):
    probe = Probe()
    assert attached_trainer(probe) is None
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(probe)
    assert attached_trainer(probe) is trainer
