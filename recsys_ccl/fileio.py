"""Crash-safe output: directories and files appear complete or not at all."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import threading
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from recsys_ccl.errors import RecsysError

__all__ = ["BackgroundSha256", "atomic_directory", "atomic_file", "check_replaceable",
           "remove_stale_temporaries", "sha256_file", "sha256_files", "sha256_tensors",
           "write_json_atomic"]


FAULT_ENV = "RECSYS_CCL_FAULT_POINT"


def fault_point(name: str) -> None:
    """Die here (SIGKILL, as a power cut or the OOM killer would) when the environment names
    this point: how the crash tests stop a command at an exact step of writing its output
    instead of at a moment. Points: directory.begin (the temporary directory exists, empty),
    directory.written (everything written, nothing synced), directory.synced (synced, not
    renamed), directory.swapped (the new output in place, the old one not yet removed)."""
    if os.environ.get(FAULT_ENV) == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _tag() -> str:
    """pid + random: names a temporary by the process that owns it."""
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(out: str | Path) -> list[Path]:
    """Remove what an interrupted run left beside `out`: `.<name>.tmp-<pid>-*` of processes
    that no longer run, and `.<name>.old-*` set aside for a rename that completed (`out`
    exists). A `.old-*` without `out` is the previous result of a run killed between its two
    renames: it is kept and named. Returns what was removed; notes go to stderr."""
    out = Path(out).absolute()
    removed = []
    if not out.parent.is_dir():
        return removed
    for p in out.parent.glob(f".{out.name}.tmp-*"):
        pid = p.name.rsplit(".tmp-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    for p in out.parent.glob(f".{out.name}.old-*"):
        if out.exists():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
        else:
            print(f"note: {p} is the previous {out.name} of a run interrupted between its "
                  f"renames; rename it back to {out} to restore it", file=sys.stderr)
    for p in removed:
        print(f"note: removed {p}, left by an interrupted run", file=sys.stderr)
    return removed


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it to `path`, on
    any exception remove it. The one way every single-file artefact is written."""
    path = Path(path)
    remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp-{_tag()}")
    try:
        yield tmp
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_directory(out: str | Path, *, overwrite: bool = False,
                     marker: str = "manifest.json") -> Iterator[Path]:
    """Yield a fresh temporary directory beside `out`; on success rename it to `out`.

    On any exception the temporary directory is removed and `out` is untouched. An existing
    `out` is replaced only with `overwrite`, and then only after the new one is complete: the
    old directory is renamed aside first, so a crash between the two renames leaves it beside
    `out` (named `.<out>.old-*`) rather than losing it. Only an empty directory or one of ours
    (holding `marker`) is ever replaced: `--out . --overwrite` must not delete someone's files.
    """
    out = Path(out).absolute()
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise RecsysError(f"{out} already exists; pass --overwrite to replace it")
        check_replaceable(out, marker)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tag = _tag()
    tmp = out.parent / f".{out.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        fault_point("directory.begin")
        yield tmp
        fault_point("directory.written")
        _fsync_tree(tmp)
        fault_point("directory.synced")
        if out.exists() and _exchange(tmp, out):
            fault_point("directory.swapped")
            shutil.rmtree(tmp, ignore_errors=True)  # now the old directory
        elif out.exists():
            old = out.parent / f".{out.name}.old-{tag}"
            out.rename(old)
            tmp.rename(out)
            fault_point("directory.swapped")
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directory entries atomically (renameat2 RENAME_EXCHANGE); False where the
    platform or file system cannot, and then nothing changed."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b),
                     _RENAME_EXCHANGE) == 0


def check_replaceable(out: Path, marker: str) -> None:
    """Raise unless `out` is an empty directory or an earlier output (it holds `marker`), and
    is not the working directory, one of its parents, or the home directory."""
    resolved = out.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents or resolved == Path.home().resolve():
        raise RecsysError(f"refusing to replace {out}: it is the working directory, one of its "
                          f"parents or the home directory; choose a new output directory")
    if not resolved.is_dir():
        raise RecsysError(f"refusing to replace {out}: it is not a directory")
    if any(resolved.iterdir()) and not (resolved / marker).is_file():
        raise RecsysError(f"refusing to replace {out}: it is not empty and holds no {marker}, "
                          f"so it is not an output of this tool")


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with p.open("rb") as fh:
                os.fsync(fh.fileno())


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented JSON to `path` (atomic_file)."""
    with atomic_file(path) as tmp, tmp.open("w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True)
        fh.write("\n")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tensors(tensors: Mapping[str, Any], prefix: bytes = b"") -> str:
    """sha256 over `prefix`, then each tensor's name and raw bytes in name order: the one
    tensor hash (checkpoint headers, the bundle's model_version). Bytes are read through a
    uint8 view, so every dtype hashes (NumPy has no bfloat16)."""
    import torch

    h = hashlib.sha256(prefix)
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8)
                 .numpy().tobytes())
    return h.hexdigest()


def sha256_files(paths: list[Path] | tuple[Path, ...]) -> str:
    """One hash for a single file (its own sha256) or for several (over names and hashes)."""
    if len(paths) == 1:
        return sha256_file(paths[0])
    h = hashlib.sha256()
    for p in paths:
        h.update(f"{Path(p).name}:{sha256_file(p)}\n".encode())
    return h.hexdigest()


class BackgroundSha256:
    """`sha256_files(paths)` computed on a daemon thread, so that hashing a large input
    overlaps with the work done on it (file reads and hashlib release the GIL; a 500 MB CSV
    takes about 0.9 s to hash here). Not a ThreadPoolExecutor future: its worker is joined at
    exit, so a run that fails early would still wait for the whole input to be hashed."""

    def __init__(self, paths: list[Path] | tuple[Path, ...]) -> None:
        self._digest: str | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(tuple(paths),), daemon=True,
                                        name="sha256")
        self._thread.start()

    def _run(self, paths: tuple[Path, ...]) -> None:
        try:
            self._digest = sha256_files(paths)
        except BaseException as exc:  # re-raised in the caller's thread by result()
            self._error = exc

    def result(self) -> str:
        """The digest, once the hash is done (re-raises its error, such as an OSError)."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._digest is not None
        return self._digest
