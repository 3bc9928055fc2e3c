"""Atomic directory writes: build under a temporary name, then rename into place."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import uuid
from collections.abc import Collection, Iterator
from pathlib import Path

from .errors import GoraStateError

logger = logging.getLogger(__name__)

RANK_PLOT_FILE = "gora_ranks.png"
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # PEFT's names
SIDECAR_FILE = "gora_config.json"
META_FILE, TENSOR_FILE = "gora_state.json", "gora_state.safetensors"  # a saved GoraState
"""The files of an exported adapter and of a saved state, named here (no torch import) for the CLI's checks before
anything loads."""
DERIVED_FILES = frozenset({RANK_PLOT_FILE})
"""Files gora writes into a saved directory from its content (``gora inspect``'s rank plot). A new save makes them
stale, so replacing the directory may delete them."""


def check_output_directory(path: str | os.PathLike, expected: Collection[str] | None) -> None:
    """Refuse, before any work, an output that :func:`atomic_directory` would refuse after it.

    ``expected``: the names a save of this kind writes; a directory holding only those (a previous save) and
    :data:`DERIVED_FILES` may be replaced. ``None`` (the names are not known up front) skips that check and
    leaves it to :func:`atomic_directory`.

    Raises:
        GoraStateError: ``path`` is a file, a directory with other content, or cannot be created.
    """
    final = Path(os.path.abspath(path))
    if final.exists() and not final.is_dir():
        raise GoraStateError(f"{final} exists and is a file, not a directory; save to another path or remove it.")
    if final.is_dir() and expected is not None:
        _refuse_foreign(final, [e.name for e in final.iterdir() if e.name not in expected])
    ancestor = final.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise GoraStateError(f"cannot write {final}: {ancestor} is not a writable directory; "
                             "choose an output path in a directory you can write to.")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``path``; on success it replaces ``path``.

    An exception (or interrupt) inside the block leaves ``path`` exactly as it was and removes the
    temporary directory, so a half-written directory never appears under the final name. An existing
    ``path`` is replaced only if everything in it is rewritten by the new save (a previous save of the
    same kind) or is one of :data:`DERIVED_FILES`: a directory holding anything else, or a file, is refused
    rather than deleted.

    Directories that earlier saves to ``path`` left when they were killed (SIGKILL, power loss) are removed:
    see :func:`clean_leftovers`.

    Raises:
        GoraStateError: ``path`` is a file, a directory holding entries the new save does not rewrite, or cannot
            be written (an ``OSError`` such as a full disk, chained as the cause; ``path`` is left as it was).
    """
    final = Path(os.path.abspath(path))
    if final.exists() and not final.is_dir():
        raise GoraStateError(f"{final} exists and is a file, not a directory; save to another path or remove it.")
    tmp = final.parent / _scratch_name(final, "tmp")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as error:  # read-only or missing permissions: nothing was written
        raise GoraStateError(f"cannot write {final} ({error.strerror or error}); "
                             "choose an output path in a directory you can write to.") from error
    stale = clean_leftovers(final, keep_backups=False)  # a killed earlier save's directories; backups go after success
    try:
        try:
            yield tmp
            _fsync_tree(tmp)
            if final.exists():
                _check_replaceable(final, tmp)
                old = final.parent / _scratch_name(final, "old")
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
        except OSError as error:  # disk full, quota, I/O error: the previous save at ``final`` is untouched
            what = "the previous save there is unchanged" if final.exists() else "nothing was written there"
            raise GoraStateError(f"cannot write {final} ({error.strerror or error}); {what}. Free some space "
                                 "(or fix the file system) and save again, or save to another path.") from error
        for backup in stale:  # the new save replaced what a killed save had kept as a backup
            shutil.rmtree(backup, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


_SCRATCH = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-(?:(?P<pid>\d+)-)?[0-9a-f]{8}")


def _scratch_name(final: Path, kind: str) -> str:
    """``.NAME.tmp-PID-XXXXXXXX`` (the save being written) or ``.NAME.old-PID-XXXXXXXX`` (the version it replaces):
    the process id tells a later save whether the directory's writer is still running."""
    return f".{final.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _leftovers(final: Path) -> list[tuple[Path, str, bool]]:
    """``(directory, kind, writer alive)`` for the scratch directories of saves to ``final`` (names matched exactly:
    another target's scratch directories, such as those of ``NAME.tmp-1``, are never taken for these)."""
    found = []
    try:
        for entry in final.parent.iterdir():
            match = _SCRATCH.fullmatch(entry.name)
            if match and match["name"] == final.name and entry.is_dir() and not entry.is_symlink():
                found.append((entry, match["kind"], match["pid"] is not None and _process_alive(int(match["pid"]))))
    except OSError:  # a parent that is missing or may not be listed: nothing to clean there
        return []
    return sorted(found)


def _process_alive(pid: int) -> bool:
    """Whether ``pid`` runs on this machine (another user's process counts as running)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def clean_leftovers(path: str | os.PathLike, *, keep_backups: bool = True) -> list[Path]:
    """Remove what saves to ``path`` killed mid-way (SIGKILL, power loss) left beside it; return the backups kept.

    A ``.NAME.tmp-*`` directory is an unfinished save: removed. A ``.NAME.old-*`` directory is the previous version
    that a save moved aside: removed when ``path`` exists (the save completed), kept (and returned) when ``path`` is
    missing, since it is then the only complete copy, unless ``keep_backups`` is false (a new save is about to take
    its place: the caller removes them once that save is complete). Directories of a save still running (its process
    is alive) are left alone.
    """
    final = Path(os.path.abspath(path))
    kept = []
    for entry, kind, alive in _leftovers(final):
        if alive:
            continue
        if kind == "old" and not final.exists():
            kept.append(entry)
            if keep_backups:
                continue
        if kind == "tmp" or final.exists():
            logger.info("removing %s, left by a save to %s that was killed mid-way", entry, final)
            shutil.rmtree(entry, ignore_errors=True)
    return kept


def _check_replaceable(final: Path, new: Path) -> None:
    """Refuse to replace a directory holding entries that the new version would not rewrite (derived files aside)."""
    _refuse_foreign(final, [entry.name for entry in final.iterdir() if not (new / entry.name).exists()])


def _refuse_foreign(final: Path, names: list[str]) -> None:
    foreign = sorted(name for name in names if name not in DERIVED_FILES)
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
    backups = [entry for entry, kind, _ in _leftovers(final) if kind == "old"]
    return sorted(backups, key=lambda p: p.stat().st_mtime)
