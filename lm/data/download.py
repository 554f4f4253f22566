"""Getting the benchmark data onto a fresh machine (``data.source: auto`` and ``download``).

- WikiText-2/103: the Hugging Face ``Salesforce/wikitext`` copy (``wikitext-2-v1`` / ``wikitext-103-v1``,
  which are the tokenized ``.tokens`` files): its parquet files through ``huggingface_hub`` + ``pyarrow``
  (``hub_split``), written back as the original files.
- SST-2: ``nyu-mll/glue`` (``sst2``), the same way, written as GLUE's train.tsv / dev.tsv after every row
  is checked (``sst2_tsv``).
- EnWik8: the canonical ``enwik8.zip`` over plain HTTP (the hub copy is a script dataset, not parquet),
  from ``data.base_url`` (default mattmahoney.net), sha256 pinned.

Everything lands in the data root (``data.root``, else $LM_DATA_DIR, else ./data) exactly as a manual
download would, so later runs read it as local files and never download again. A corpus is written to a
hidden folder and renamed into place in one step, and files are checked against the pinned sha256
where the canonical value is known, so an interrupted or corrupted download never looks like data.
A file lock in the data root makes concurrent processes (e.g. DDP ranks) download once; the process holding
it first removes what killed downloads left behind (``.part`` files, ``.partial`` folders): no live
download can own them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from lm.errors import DataError

DEFAULT_BASE_URL = "http://mattmahoney.net/dc/"
ENWIK8_ZIP_SHA256 = "547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc"
HUB = {"wikitext-2": ("Salesforce/wikitext", "wikitext-2-v1"),
       "wikitext-103": ("Salesforce/wikitext", "wikitext-103-v1"),
       "sst2": ("nyu-mll/glue", "sst2")}
# The canonical files' sha256 (see the data README): a hub copy must rebuild them byte for byte,
# otherwise perplexities would not be comparable with published ones.
PINNED = {
    "wikitext-2/wiki.train.tokens": "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f",
    "wikitext-2/wiki.valid.tokens": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
    "wikitext-2/wiki.test.tokens": "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
    "wikitext-103/wiki.valid.tokens": "9aee9f52d6e77de6c7751fc5e7c44287db3ec0eaf15477098acc6b93c1c4250b",
    "wikitext-103/wiki.test.tokens": "56db52eb157b1ab5c89646eef70510c1eca6e12a3bfdb99f0d6b05b4eacb75b9",
}
BY_HAND = {
    "wikitext-2": "https://wikitext.smerity.com/wikitext-2-v1.zip (unzip; it holds wikitext-2/wiki.*.tokens) "
                  "or the parquet files of https://huggingface.co/datasets/Salesforce/wikitext (wikitext-2-v1)",
    "wikitext-103": "https://wikitext.smerity.com/wikitext-103-v1.zip (~190 MB; unzip) or the parquet files of "
                    "https://huggingface.co/datasets/Salesforce/wikitext (wikitext-103-v1)",
    "enwik8": "http://mattmahoney.net/dc/enwik8.zip (36 MB, sha256 547994d9...534bc; keep it zipped)",
    "sst2": "https://dl.fbaipublicfiles.com/glue/data/SST-2.zip (unzip into <root>/glue/) or the parquet files "
            "of https://huggingface.co/datasets/nyu-mll/glue (sst2)",
}
SOURCES = ("auto", "local", "download")


def download_root(root: str | os.PathLike | None = None) -> Path:
    """Where downloads go: ``data.root``, else $LM_DATA_DIR, else ./data (the first searched places)."""
    return Path(root or os.environ.get("LM_DATA_DIR") or Path.cwd() / "data").expanduser().resolve()


def resolve_base_url(base_url: str | None = None) -> str:
    url = base_url or os.environ.get("LM_DATA_BASE_URL") or DEFAULT_BASE_URL
    return url if url.endswith("/") else url + "/"


def not_found(name: str, expected: list[str], looked: list[Path], why: str | None = None) -> DataError:
    """The one paragraph a user sees when a corpus is neither on disk nor downloadable."""
    places = ", ".join(str(p) for p in looked) or "(nowhere)"
    title = {"sst2": "SST-2"}.get(name, name)
    head = (f"{title} is not on this machine and could not be downloaded ({why})." if why
            else f"{title} was not found (data.source: local never downloads).")
    return DataError(
        f"{head} Expected {', '.join(expected)} under one of these data roots: {places}. Fix: run where the "
        f"internet is reachable with data.source: auto (the default) or download, which puts the files into "
        f"data.root, else $LM_DATA_DIR, else ./data; or fetch "
        f"{BY_HAND[name]} by hand, place the files as expected, and point data.root (or $LM_DATA_DIR) at that root."
    )


@contextlib.contextmanager
def _locked(root: Path):
    """An exclusive lock on ``<root>/.lm-download.lock`` (``filelock``: ``flock`` on POSIX, ``msvcrt`` on Windows),
    held while one process downloads. It blocks until the holder is done (as before: a second process waits for
    the first download instead of fetching the same files again); the OS drops the lock of a killed holder."""
    from filelock import FileLock

    root.mkdir(parents=True, exist_ok=True)
    with FileLock(root / ".lm-download.lock", mode=0o666):
        yield


def remove_stale_partials(dest: Path) -> list[Path]:
    """Remove what killed downloads left in the data root: ``.<file>.*.part`` files (``fetch``) and
    ``.<name>.partial.*`` / ``.<name>.hub.partial.*`` folders (hub downloads). Call only while holding
    ``_locked(dest)``: every download into ``dest`` writes them under that lock, so none belongs to a live
    download (the kernel drops the lock of a killed process; ``kill -9`` included)."""
    gone = []
    for p in [*dest.glob(".*.partial.*"), *dest.glob("*/.*.part")]:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        gone.append(p)
    if gone:
        _say(f"removed {len(gone)} unfinished download(s) left by an interrupted run: {', '.join(map(str, gone[:3]))}")
    return gone


def _say(msg: str) -> None:
    print(f"lm: {msg}", file=sys.stderr, flush=True)


def fetch(url: str, target: Path, sha256: str | None = None, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``target`` with a progress bar: a temporary file beside it, the sha256 checked,
    then one rename. Network or checksum problems raise ``OSError`` with the reason (nothing is left)."""
    from tqdm.auto import tqdm

    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"{target.name}", file=sys.stderr,
                      mininterval=1.0) as bar:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        if sha256 is not None and digest.hexdigest() != sha256:
            raise OSError(f"{url} has sha256 {digest.hexdigest()[:12]}..., expected {sha256[:12]}... (a corrupted "
                          f"or different file; it was not kept)")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _publish(staging: Path, final: Path) -> None:
    """Rename a fully written folder into place (atomic; an existing empty folder is replaced)."""
    if final.is_dir() and not any(final.iterdir()):
        final.rmdir()
    os.rename(staging, final)


def _check_pinned(rel: str, data: bytes, origin: str) -> None:
    want = PINNED.get(rel)
    got = hashlib.sha256(data).hexdigest()
    if want is not None and got != want:
        raise OSError(f"the copy of {rel} rebuilt from {origin} has sha256 {got[:12]}..., not the canonical "
                      f"{want[:12]}... (nothing was written)")


def _endpoint() -> str | None:
    # Read at call time: huggingface_hub reads $HF_ENDPOINT once, at import, and a mirror set later (or a test's
    # stand-in server) would be ignored.
    return os.environ.get("HF_ENDPOINT") or None


def hub_split(repo: str, config: str, split: str, columns: list[str], workdir: Path) -> dict[str, list]:
    """``columns`` of one split of a hub dataset (the only network call that is not plain HTTP): its parquet
    files, ``<config>/<split>-NNNNN-of-NNNNN.parquet`` (the layout of the hub's parquet datasets), downloaded
    into ``workdir`` with huggingface_hub (tokens, mirrors via $HF_ENDPOINT, offline mode) and read with pyarrow.

    Why not ``datasets``: it was used only for this one-time download, and it pulls in pandas, aiohttp, its
    own cache (a second copy of every file) and retries for half a minute offline. Why pyarrow stays: every
    parquet reader needs a native library (the hub's files are snappy/zstd-compressed), and pyarrow is the one
    that huggingface_hub's own tooling and the hub's parquet converter write with."""
    import pyarrow.parquet as pq
    from huggingface_hub import HfApi, hf_hub_download

    endpoint = _endpoint()
    prefix = f"{config}/{split}-"
    names = sorted(f.path for f in HfApi(endpoint=endpoint).list_repo_tree(repo, config, repo_type="dataset")
                   if f.path.startswith(prefix) and f.path.endswith(".parquet") and "/" not in f.path[len(prefix):])
    if not names:
        raise OSError(f"the hub dataset {repo} has no {prefix}*.parquet file (its layout changed?)")
    tables = [pq.read_table(hf_hub_download(repo, n, repo_type="dataset", local_dir=workdir, endpoint=endpoint),
                            columns=columns) for n in names]
    return {c: [v for t in tables for v in t.column(c).to_pylist()] for c in columns}


def _hub_text(name: str, split: str, workdir: Path) -> bytes:
    path, config = HUB[name]
    rows = hub_split(path, config, split, ["text"], workdir)["text"]
    out = []
    for r in rows:
        # HF keeps each line's '\n' and turns whitespace-only lines into ''; the files hold ' ' there.
        r = r[:-1] if r.endswith("\n") else r
        out.append((r or " ") + "\n")
    return "".join(out).encode("utf-8")


def sst2_tsv(sentences: list, labels: list, where: str) -> bytes:
    """GLUE's TSV layout of the hub's SST-2 rows, each row checked first: a sentence with a line break would
    split its row, and a label other than 0/1 (GLUE's unlabelled test rows carry -1) is not a training label.
    Published files are trusted by every later run (``auto`` never downloads again), so nothing bad is written."""
    if len(sentences) != len(labels) or not sentences:
        raise ValueError(f"{where} has {len(sentences)} sentences and {len(labels)} labels (nothing was written)")
    rows = []
    for i, (s, y) in enumerate(zip(sentences, labels)):
        if not isinstance(s, str) or not s.strip() or "\n" in s or "\r" in s:
            raise ValueError(f"row {i} of {where} has an empty sentence or one with a line break: {str(s)[:60]!r} "
                             f"(nothing was written)")
        if isinstance(y, bool) or y not in (0, 1):
            raise ValueError(f"row {i} of {where} has the label {y!r}, not 0 or 1 (nothing was written)")
        # GLUE's TSVs end every sentence with a space before the tab; tabs inside would break a row.
        rows.append(f"{s.replace(chr(9), ' ').strip()} \t{int(y)}\n")
    return ("sentence\tlabel\n" + "".join(rows)).encode("utf-8")


def materialise(name: str, root: str | os.PathLike | None = None, base_url: str | None = None,
                searched: list[Path] | None = None) -> Path:
    """Download ``name`` (a corpus or ``sst2``) into the data root unless it is already there; returns
    the root. Any failure is a ``DataError`` naming the files, the places (``searched``, else the data
    root) and the manual URLs."""
    dest = download_root(root)
    expected = _expected(name)
    with _locked(dest):
        remove_stale_partials(dest)
        if all((dest / e).is_file() for e in expected) or (name == "enwik8" and (dest / "enwik8" / "enwik8").is_file()):
            return dest  # another process (or an earlier run) finished it, or it is there unzipped
        try:
            _download(name, dest, base_url)
        except DataError:
            raise
        except Exception as e:  # network, hub, auth, checksum: the user's fix is the same
            gist = (str(e).strip().splitlines() or [""])[0][:240]
            raise not_found(name, expected, searched or [dest], f"{type(e).__name__}: {gist}") from None
    return dest


def _expected(name: str) -> list[str]:
    if name == "enwik8":
        return ["enwik8/enwik8.zip"]
    if name == "sst2":
        return ["glue/SST-2/train.tsv", "glue/SST-2/dev.tsv"]
    return [f"{name}/wiki.{s}.tokens" for s in ("train", "valid", "test")]


def _download(name: str, dest: Path, base_url: str | None) -> None:
    if name == "enwik8":
        url = resolve_base_url(base_url) + "enwik8.zip"
        _say(f"downloading {url} into {dest / 'enwik8'}")
        fetch(url, dest / "enwik8" / "enwik8.zip", ENWIK8_ZIP_SHA256)
        return
    path, config = HUB[name]
    _say(f"downloading {name} from the Hugging Face hub ({path}, {config}) into {dest}")
    staging = Path(tempfile.mkdtemp(dir=dest, prefix=f".{name}.partial."))
    hub = Path(tempfile.mkdtemp(dir=dest, prefix=f".{name}.hub.partial."))  # the parquet files, removed after
    try:
        if name == "sst2":
            for split, hub_name in (("train", "train"), ("dev", "validation")):
                cols = hub_split(path, config, hub_name, ["sentence", "label"], hub)
                (staging / f"{split}.tsv").write_bytes(sst2_tsv(cols["sentence"], cols["label"],
                                                                f"{path}/{config} {hub_name}"))
            (dest / "glue").mkdir(exist_ok=True)
            _publish(staging, dest / "glue" / "SST-2")
        else:
            for split, hub_name in (("train", "train"), ("valid", "validation"), ("test", "test")):
                data = _hub_text(name, hub_name, hub)
                _check_pinned(f"{name}/wiki.{split}.tokens", data, f"{path}/{config}")
                (staging / f"wiki.{split}.tokens").write_bytes(data)
            _publish(staging, dest / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(hub, ignore_errors=True)
    _say(f"{name} is in {dest}; later runs read it from there")


__all__ = ["SOURCES", "download_root", "fetch", "materialise", "not_found", "remove_stale_partials", "resolve_base_url",
           "sst2_tsv"]
