"""Print the word-swap rate table of docs/corruptions.md: WikiText test splits × rates × samplings.

    python scripts/word_swap_table.py [--root ../shared/data] [--seed 0] [--out_dir .cache/corruptions]

For every (split, rate, sampling) it runs ``corrupt_file`` (the same call as ``lm corrupt SPLIT --rate R
--sampling S --seed 0``; cached) and prints one markdown row from the manifest: realised swaps and their
expectation over seeds, the effective word rate, the token-level change rate (with and without the
``<unk>`` no-ops), and how many lines that have an eligible word stay clean (realised / expected).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from corruptions import SAMPLINGS, corrupt_file

SPLITS = [("WT103 test", "wikitext-103/wiki.test.tokens"), ("WT2 test", "wikitext-2/wiki.test.tokens")]
RATES = [0.015, 0.025, 0.05]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out_dir", default=".cache/corruptions")
    args = ap.parse_args()
    print("| split | rate | sampling | swaps (expected) / words | effective word rate | token change rate "
          "(excl. `<unk>`) | swaps on `<unk>` | eligible lines left clean (expected) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, rel in SPLITS:
        for rate in RATES:
            for sampling in SAMPLINGS:
                m = corrupt_file(Path(args.root) / rel, "word_swap", rate, seed=args.seed, out_dir=args.out_dir,
                                 sampling=sampling).manifest
                print(f"| {name} | {rate:g} | {sampling} | {m['n_swaps']} ({m['n_swaps_expected']:.0f}) / "
                      f"{m['n_words']} | {m['effective_rate']:.4f} | {m['token_change_rate']:.4f} "
                      f"({m['token_change_rate_excl_unk']:.4f}) | {m['unk_swaps']} ({m['unk_swap_fraction']:.1%}) | "
                      f"{m['n_lines_eligible_clean']} ({m['n_lines_eligible_clean_expected']:.0f}) of "
                      f"{m['n_lines_with_eligible']} |")


if __name__ == "__main__":
    main()
