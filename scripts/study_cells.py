"""The recipes of scripts/study.py (cells, variants, corruption rates, the small model's data), in one place:
study.py plans runs from them and study_report.py describes them, and neither imports the other for them."""

from __future__ import annotations

TINY = ["--config", "configs/wikitext2/tiny.yaml"]
# The starting point the issue names: the paper's head geometry (8 x 32), float32, batch 32, warm-up 100.
BASE = ["--trainer.precision", "32-true", "--model.n_head", "8", "--model.d_head", "32",
        "--data.batch_size", "32", "--model.optim.warmup_steps", "100"]
# Each cell flips one factor of BASE toward the old tiny recipe (4 x 64, bf16-mixed, batch 16, warm-up 200);
# d64_sqrt also gives Elliptical the 1/sqrt(D) softmax always has (so its softmax run is d64's).
CELLS: dict[str, tuple[str, list[str]]] = {
    "base": ("8 heads x 32, float32, batch 32, warm-up 100", []),
    "d64": ("4 heads x 64", ["--model.n_head", "4", "--model.d_head", "64"]),
    "d64_sqrt": ("4 heads x 64, Elliptical scale sqrt", ["--model.n_head", "4", "--model.d_head", "64"]),
    "bf16": ("bf16-mixed", ["--trainer.precision", "bf16-mixed"]),
    "b16": ("batch 16", ["--data.batch_size", "16"]),
    "wu200": ("warm-up 200", ["--model.optim.warmup_steps", "200"]),
}
SQRT = ["--model.attention.options", '{"scale": "sqrt", "estimator": "segment_mean", "normalize": "max"}']
CURVE_VARIANTS = ["softmax", "elliptical", "quest", "elliptical_quest", "elliptical_switch"]
WORD_RATES = [0.005, 0.015, 0.025, 0.05, 0.10]
CHAR_RATES = [0.015, 0.05]
# The paper's small shape (REFERENCE §3a) on WikiText-2: its 33,278-word vocabulary needs the tiny cutoffs.
SMALL = {"softmax": "configs/wikitext103/small.yaml", "elliptical": "configs/wikitext103/small_elliptical.yaml"}
# The paper's optimiser (Adam 2.5e-4, Transformer-XL's cosine) shortened to the step budget, warm-up a tenth of it;
# batch 16 x 256 instead of 96 x 256. The budget is in steps, not minutes, so that it does not depend on how many
# runs share the CPU.
SMALL_DATA = ["--data.corpus", "wikitext-2", "--model.cutoffs", "[2000, 10000]", "--data.batch_size", "16",
              "--trainer.val_check_interval", "200", "--trainer.limit_val_batches", "20",
              "--trainer.log_every_n_steps", "10"]

