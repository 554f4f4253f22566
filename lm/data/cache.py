"""On-disk cache of tokenized splits, keyed by CONTENT.

The ``datasets`` cache keys local files by path and mtime, so an edited or replaced file can be
served stale; here the key is sha256(source bytes) + vocab sha256 + format version. Each entry is an
``.npy`` plus a ``.json`` sidecar with the key and the sha256 of the ``.npy`` bytes; both are checked
on load, and a stale or corrupted entry is logged and rebuilt, never used. Entries are named by label,
vocabulary and source content, so an edited file gets a new entry (the old one stays until the cache directory
is deleted; ``.cache/tokens`` is safe to delete at any time).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lm.utils import atomic_write_bytes  # temp file in the same dir + fsync + os.replace

log = logging.getLogger(__name__)
FORMAT_VERSION = 1  # bump when the encoding rules change: every old entry becomes stale


class TokenCache:
    def __init__(self, directory: str | os.PathLike = ".cache/tokens"):
        self.dir = Path(directory)

    def load_or_build(self, label: str, source: bytes, vocab_sha: str, build: Callable[[], np.ndarray]) -> np.ndarray:
        """Cached ``build()`` for ``source`` under ``vocab_sha``; ``label`` only names the files."""
        source_sha = hashlib.sha256(source).hexdigest()
        key = hashlib.sha256(f"v{FORMAT_VERSION}:{source_sha}:{vocab_sha}".encode()).hexdigest()
        # One entry per (content, vocabulary), not per label: the study evaluates a dozen corrupted test files
        # under one label, and a per-label slot rebuilt each of them every time (and let two processes race).
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", label) + f".{vocab_sha[:12]}.{source_sha[:12]}"
        npy, meta = self.dir / f"{stem}.npy", self.dir / f"{stem}.json"
        if meta.exists():
            data, problem = self._read(npy, meta, key)
            if data is not None:
                return np.load(io.BytesIO(data), allow_pickle=False)
            log.warning("Token cache entry %s is %s; rebuilding it.", npy, problem)
        arr = build()
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        atomic_write_bytes(npy, buf.getvalue())  # data first, sidecar last: the sidecar commits the entry
        side = {"key": key, "npy_sha256": hashlib.sha256(buf.getvalue()).hexdigest(), "label": label,
                "format": FORMAT_VERSION, "shape": list(arr.shape), "dtype": str(arr.dtype)}
        atomic_write_bytes(meta, json.dumps(side, indent=1).encode())
        return arr

    @staticmethod
    def _read(npy: Path, meta: Path, key: str) -> tuple[bytes | None, str | None]:
        """(the verified .npy bytes, None), or (None, why the entry cannot be used)."""
        try:
            side = json.loads(meta.read_text())
            if side.get("key") != key:
                return None, "stale (source file or vocabulary changed)"
            data = npy.read_bytes()
        except (OSError, ValueError) as e:
            return None, f"unreadable ({e})"
        if hashlib.sha256(data).hexdigest() != side.get("npy_sha256"):
            return None, "corrupted (checksum mismatch)"
        return data, None
