"""Small shared helpers."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from lm.errors import ConfigError


def current_umask() -> int:
    """The process umask (read by setting it and putting it back: there is no getter)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half of one:
    a temporary file in the same directory, fsync, then ``os.replace`` (atomic on POSIX). The file
    gets the usual permissions (0666 minus the umask), not mkstemp's private 0600."""
    path = Path(path)
    make_dirs(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), 0o666 & ~current_umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def cpu_bf16_native(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> bool | None:
    """Whether this CPU multiplies bf16 matrices in hardware: True with x86 AVX512-BF16 or AMX-BF16 (or an
    Arm core with BF16), False when ``cpuinfo`` lists the CPU's flags and none of those is among them, None
    when it cannot tell (no /proc/cpuinfo). Without them PyTorch runs bf16 matmuls in a scalar fallback
    that measured 0.2-3 GFLOP/s against float32's 10-17 on an AVX2-only AMD EPYC (one core): bf16-mixed
    training there is many times SLOWER than float32, the opposite of what the recipes' bf16 is for."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):  # x86 / Arm
            flags.update(value.split())
    if not flags:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


# Write failures caused by the machine or the paths given, not by a bug: reported in one paragraph.
WRITE_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                errno.EROFS: "the filesystem is read-only", errno.EACCES: "permission denied",
                errno.EPERM: "permission denied", errno.ENOTDIR: "a part of the path is a file, not a folder",
                errno.EEXIST: "a file of that name is in the way", errno.EISDIR: "it is a folder, not a file"}


class FolderNotCreatable(FileNotFoundError):
    """``make_dirs`` could not create a folder (ENOENT from mkdir: a path under /proc, a vanished mount): a write
    failure, unlike the ENOENT of a missing input file, which stays a bug with a traceback."""


def make_dirs(folder: str | os.PathLike) -> Path:
    """``mkdir -p folder``; a folder that cannot be created at all raises ``FolderNotCreatable``."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileNotFoundError as e:
        raise FolderNotCreatable(e.errno, e.strerror, e.filename or str(folder)) from None
    return folder


def write_error(exc: OSError) -> ConfigError | None:
    """One paragraph for an ``OSError`` from writing a file or folder (full disk, read-only filesystem, a path
    through a file, a folder that cannot be created); None for other OSErrors (those stay bugs with a traceback)."""
    why = "the folder cannot be created there" if isinstance(exc, FolderNotCreatable) else WRITE_ERRNOS.get(exc.errno)
    if why is None:
        return None
    where = exc.filename or "(unknown path)"
    return ConfigError(
        f"Cannot write {where}: {why} ({exc.strerror}). Nothing half-written was left behind (files are written "
        f"atomically). Free disk space, or point the option that names this path (--trainer.default_root_dir, "
        f"--data.cache_dir, --out, ...) at a writable folder, then rerun; a fit resumes with --ckpt_path last."
    )


class RunLock:
    """An exclusive, non-blocking lock on ``<run_dir>/.lock`` (``filelock``). Creating the folder and the lock file
    also proves the folder is writable, before any real file is written. ``command`` and ``elsewhere`` (how to
    pick another folder) go into the refusal."""

    def __init__(self, run_dir: str | os.PathLike, command: str = "lm fit",
                 elsewhere: str = "train into another folder with --trainer.default_root_dir runs/NEW"):
        self.run_dir, self.command, self.elsewhere = Path(run_dir), command, elsewhere
        self._lock = None

    def acquire(self) -> None:
        from filelock import FileLock, Timeout

        path = self.run_dir / ".lock"
        try:
            make_dirs(self.run_dir)
            lock = FileLock(path, mode=0o666)
            lock.acquire(timeout=0)
        except Timeout:
            raise ConfigError(
                f"Another `{self.command}` is writing to {self.run_dir} right now (it holds {path}). Two runs in one "
                f"folder would overwrite each other's files: wait for it to finish (or stop it), or {self.elsewhere}."
            ) from None
        except OSError as e:
            err = write_error(e)
            if err is None:
                raise
            raise ConfigError(f"The folder {self.run_dir} cannot be used: {err}") from None
        self._lock = lock

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def check_writable_dir(folder: str | os.PathLike, option: str, example: str) -> Path:
    """Create ``folder`` and write (and remove) a probe file in it, so that an unusable output folder (under /proc,
    through a file, read-only, full) is one paragraph naming ``option`` before any work, not an ``OSError``
    traceback after it. Any OSError counts here: this is an output folder the user named, so even ENOENT (mkdir
    under /proc) is their path, not a bug."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
    except OSError as e:
        raise unwritable(option, folder, e, example) from None
    return folder


def unwritable(option: str, folder: str | os.PathLike, e: OSError, example: str) -> ConfigError:
    """The paragraph for an output folder that could not be created or written (``check_writable_dir``)."""
    return ConfigError(f"{option} {folder} cannot be written: {e.strerror or e} ({e.filename or folder}). "
                       f"Nothing was written. Pass a writable folder, e.g. {option} {example}.")
