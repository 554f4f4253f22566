"""GLUE SST-2 files: finding, reading and (``source: hub``) materialising ``train.tsv``/``dev.tsv``.

Files: ``<root>/glue/SST-2/{train,dev}.tsv`` with the header ``sentence<TAB>label`` (GLUE release);
the roots are searched like the language-modelling corpora (``data.root``, $LM_DATA_DIR, ./data,
../shared/data next to the working directory and next to the checkout). ``source: hub`` writes the
Hugging Face ``glue/sst2`` copy to local TSV files first (offline: a DataError, never a traceback).
"""

from __future__ import annotations

from pathlib import Path

from lm.data.corpora import resolve_roots
from lm.errors import DataError, unknown
from lm.utils import atomic_write_text

SPLITS = ("train", "dev")
SOURCES = ("local", "hub")
HOW_TO_GET = ("download SST-2.zip with the GLUE download script (or from https://dl.fbaipublicfiles.com/glue/"
              "data/SST-2.zip) and unzip it so that <root>/glue/SST-2/train.tsv and dev.tsv exist")


def find_sst2(root: str | None = None, source: str = "local", cache_dir: str = ".cache") -> dict[str, Path]:
    """Paths of the train and dev TSVs (each split searched independently over the roots)."""
    if source not in SOURCES:
        raise unknown("data.source", source, SOURCES)
    roots = [materialise_hub(cache_dir)] if source == "hub" else resolve_roots(root)
    out, looked = {}, []
    for split in SPLITS:
        tried = [r / "glue" / "SST-2" / f"{split}.tsv" for r in roots]
        looked += tried
        found = next((p for p in tried if p.is_file()), None)
        if found is None:
            places = "\n  ".join(str(p) for p in tried)
            raise DataError(f"The SST-2 {split} split was not found. Looked in:\n  {places}\nTo get it: "
                            f"{HOW_TO_GET}; then set data.root (or LM_DATA_DIR) to that root, or use "
                            f"data.source: hub when the Hugging Face hub is reachable.")
        out[split] = found
    return out


def read_tsv(path: str | Path) -> tuple[list[str], list[int]]:
    """Sentences and 0/1 labels of a GLUE SST-2 TSV; any malformed row is a DataError with its line."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise DataError(f"Cannot read {path}: {e.strerror}.") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not valid UTF-8 (byte offset {e.start}). Re-download the GLUE SST-2 "
                        f"files; they are UTF-8 text.") from None
    lines = text.replace("\r\n", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise DataError(f"{path} is empty. Re-download the GLUE SST-2 files.")
    if lines[0].strip().split("\t") != ["sentence", "label"]:
        raise DataError(f"{path}, line 1: expected the header 'sentence<TAB>label', found {lines[0][:80]!r}. "
                        f"Use the GLUE train.tsv/dev.tsv (test.tsv has no labels).")
    sentences, labels = [], []
    for n, line in enumerate(lines[1:], start=2):
        parts = line.split("\t")
        if len(parts) != 2:
            raise DataError(f"{path}, line {n}: expected 2 tab-separated columns (sentence, label), found "
                            f"{len(parts)}: {line[:80]!r}. Fix or delete that line (a sentence must not contain "
                            f"a tab), or re-download the GLUE SST-2 files.")
        sentence, label = parts[0].strip(), parts[1].strip()
        if label not in ("0", "1"):
            raise DataError(f"{path}, line {n}: the label must be 0 or 1, found {label[:20]!r}. Fix that line "
                            f"or re-download the GLUE SST-2 files.")
        if not sentence:
            raise DataError(f"{path}, line {n}: the sentence is empty. Fix or delete that line.")
        sentences.append(sentence)
        labels.append(int(label))
    if not sentences:
        raise DataError(f"{path} has a header but no rows. Re-download the GLUE SST-2 files.")
    return sentences, labels


def materialise_hub(cache_dir: str) -> Path:
    """Write the hub's ``glue/sst2`` train/validation splits as GLUE TSVs under ``<cache_dir>/hub``."""
    root = Path(cache_dir).expanduser().resolve() / "hub"
    for split, hub_split in (("train", "train"), ("dev", "validation")):
        target = root / "glue" / "SST-2" / f"{split}.tsv"
        if target.is_file():
            continue
        try:
            import datasets

            ds = datasets.load_dataset("glue", "sst2", split=hub_split)
            rows = [(str(s).replace("\t", " ").strip(), int(y)) for s, y in zip(ds["sentence"], ds["label"])]
        except Exception as e:  # offline, auth, API changes: all the same to the user
            first = str(e).splitlines()[0] if str(e) else ""
            raise DataError(f"Could not load SST-2 (glue/sst2, split {hub_split}) from the Hugging Face hub: "
                            f"{type(e).__name__}: {first}. The hub is unreachable offline; use data.source: "
                            f"local and {HOW_TO_GET}.") from None
        atomic_write_text(target, "sentence\tlabel\n" + "".join(f"{s} \t{y}\n" for s, y in rows))
    return root
