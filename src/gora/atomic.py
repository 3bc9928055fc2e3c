"""Atomic directory writes: build under a temporary name, then rename into place."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from .errors import GoraStateError


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``path``; on success it replaces ``path``.

    An exception (or interrupt) inside the block leaves ``path`` exactly as it was and removes the
    temporary directory, so a half-written directory never appears under the final name. An existing
    ``path`` is replaced only if everything in it is rewritten by the new save (a previous save of the
    same kind): a directory holding anything else, or a file, is refused rather than deleted.

    Raises:
        GoraStateError: ``path`` is a file, or a directory holding entries the new save does not rewrite.
    """
    final = Path(os.path.abspath(path))
    if final.exists() and not final.is_dir():
        raise GoraStateError(f"{final} exists and is a file, not a directory; save to another path or remove it.")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if final.exists():
            _check_replaceable(final, tmp)
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            try:
                os.replace(tmp, final)
            except BaseException:  # interrupted between the two renames: put the previous version back
                if not final.exists():
                    os.replace(old, final)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_directory(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _check_replaceable(final: Path, new: Path) -> None:
    """Refuse to replace a directory holding entries that the new version would not rewrite."""
    foreign = sorted(entry.name for entry in final.iterdir() if not (new / entry.name).exists())
    if foreign:
        shown = ", ".join(foreign[:5]) + (f", ... ({len(foreign)} in all)" if len(foreign) > 5 else "")
        raise GoraStateError(
            f"refusing to replace {final}: it holds {shown}, which this save would delete. "
            "Save to a new or empty directory, or remove those entries first."
        )


def _fsync_tree(directory: Path) -> None:
    for file in directory.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def interrupted_saves(path: str | os.PathLike) -> list[Path]:
    """Previous versions of ``path`` left as ``.NAME.old-*`` by a save killed between its two renames (oldest first)."""
    final = Path(os.path.abspath(path))
    if not final.parent.is_dir():
        return []
    return sorted((p for p in final.parent.glob(f".{final.name}.old-*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
