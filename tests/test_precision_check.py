"""bf16 on a CPU without bf16 matrix instructions: detected from /proc/cpuinfo, warned about at set-up (one line)."""

from __future__ import annotations

import lightning as L
import pytest

import lm.precision
import lm.tasks.precision_check as pc
from lm.utils import cpu_bf16_native

X86 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu vme sse sse2 avx avx2 fma {extra}\n\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes {extra}\n\n"


@pytest.mark.parametrize("text, expected", [
    (X86.format(extra=""), False),                      # AVX2 only (this project's CI machine today)
    (X86.format(extra="avx512f avx512bw"), False),      # AVX-512 without its BF16 extension
    (X86.format(extra="avx512f avx512_bf16"), True),
    (X86.format(extra="amx_tile amx_bf16"), True),
    (ARM.format(extra=""), False),
    (ARM.format(extra="bf16 i8mm"), True),
    ("processor\t: 0\nmodel name\t: something\n", None),  # no flag line: cannot tell
])
def test_cpu_bf16_native_reads_the_flags(tmp_path, text, expected):
    f = tmp_path / "cpuinfo"
    f.write_text(text)
    assert cpu_bf16_native(f) is expected


def test_missing_cpuinfo_is_unknown(tmp_path):
    assert cpu_bf16_native(tmp_path / "nope") is None


@pytest.mark.parametrize("native, precision, warns", [
    (False, "bf16-mixed", True), (True, "bf16-mixed", False), (None, "bf16-mixed", False), (False, "32-true", False),
])
def test_callback_warns_only_for_bf16_on_a_cpu_without_it(monkeypatch, tmp_path, capsys, native, precision, warns):
    monkeypatch.setattr(lm.precision, "cpu_bf16", lambda: native)
    trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    capsys.readouterr()
    pc.PrecisionCheck().setup(trainer, L.LightningModule(), "fit")
    err = capsys.readouterr().err
    hits = [line for line in err.splitlines() if "bf16 matrix instructions" in line]
    assert len(hits) == (1 if warns else 0) and len(err.splitlines()) == len(hits), err  # one line, no source line
    if warns:
        assert hits[0].startswith("lm: warning: ") and "--trainer.precision auto (or 32-true)" in hits[0]
