"""GLUE SST-2 files: finding (downloading with ``source: auto``) and reading ``train.tsv``/``dev.tsv``.

Files: ``<root>/glue/SST-2/{train,dev}.tsv`` with the header ``sentence<TAB>label`` (GLUE release);
the roots are searched like the language-modelling corpora (``data.root``, $LM_DATA_DIR, ./data,
../shared/data next to the working directory and next to the checkout). ``source: auto`` downloads
Hugging Face's ``nyu-mll/glue`` sst2 into the data root as these TSVs when no root has them
(``lm.data.download``; offline: a DataError naming the files, the places and the URLs).
"""

from __future__ import annotations

from pathlib import Path

from lm.data.corpora import resolve_roots
from lm.data.download import BY_HAND, SOURCES, materialise, not_found
from lm.errors import DataError, unknown

SPLITS = ("train", "dev")


def find_sst2(root: str | None = None, source: str = "auto") -> dict[str, Path]:
    """Paths of the train and dev TSVs: both from the first root that has both (``source`` as for the
    corpora: ``auto`` downloads them into the data root when no root has them)."""
    if source not in SOURCES:
        raise unknown("data.source", source, SOURCES)
    # An explicit root is a statement of where the data is (as for the corpora, lm.data.corpora.find_corpus):
    # one that does not exist is an error with `local`, and with `auto` SST-2 is downloaded INTO it; another
    # place's copy is never used instead.
    explicit_missing = root is not None and not Path(root).expanduser().is_dir()
    if explicit_missing and source == "local":
        raise DataError(f"SST-2 was not found (data.source: local never downloads): data.root names a folder that "
                        f"does not exist, and no other place is searched instead. Expected glue/SST-2/train.tsv and "
                        f"glue/SST-2/dev.tsv under {root}. Point data.root at the folder that holds glue/SST-2/ (e.g. "
                        f"../shared/data), leave it unset to search $LM_DATA_DIR, ./data and ../shared/data, set "
                        f"data.source: auto to download SST-2 into it, or fetch {BY_HAND['sst2']} by hand.")
    roots = ([materialise("sst2", root)] if source == "download" or explicit_missing else resolve_roots(root))

    def found(r: Path) -> bool:
        return all((r / "glue" / "SST-2" / f"{s}.tsv").is_file() for s in SPLITS)

    chosen = next((r for r in roots if found(r)), None)
    if chosen is None and source == "auto":
        chosen = materialise("sst2", root, searched=roots)
    if chosen is None:
        raise not_found("sst2", [f"glue/SST-2/{s}.tsv" for s in SPLITS], roots)
    return {s: chosen / "glue" / "SST-2" / f"{s}.tsv" for s in SPLITS}


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
