"""Files written atomically: the one temporary-and-rename helper every writer uses.

A file or folder is written under a hidden temporary name beside its target and renamed onto it,
so a reader never sees half a file and a killed writer leaves only a temporary behind
(``.<stem>.<pid>-<random>.tmp<suffix>``; :func:`remove_stale_temporaries` clears those whose
process is gone).
"""

import contextlib
import math
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


class VerseFormatError(ValueError):
    """A file is missing, unreadable or does not follow the expected VerSe format."""


def temporary_path(path) -> Path:
    """Hidden temporary name beside ``path`` that keeps the extension (SimpleITK picks by it).

    ``.<stem>.<pid>-<random>.tmp<suffix>``: the writer's process id lets a later run tell a file
    left by a killed run from one still being written (:func:`remove_stale_temporaries`).
    """
    path = Path(path)
    suffix = _suffix(path.name)
    return path.with_name(
        f"{_temporary_prefix(path.name)}{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{suffix}"
    )


def _suffix(name: str) -> str:
    return ".nii.gz" if name.lower().endswith(".nii.gz") else Path(name).suffix


def _temporary_prefix(name: str) -> str:
    """``.<stem>.``: how the temporary names of output ``name`` begin."""
    suffix = _suffix(name)
    return f".{name[: len(name) - len(suffix)] if suffix else name}."


_TEMPORARY = re.compile(  # this version's names, then older ones (without process id)
    r"^\..+\.((?P<pid>\d+)-[0-9a-f]{8}|[0-9a-f]{12})\.tmp(\.[A-Za-z.]+)?$|^\..+\.tmp-[0-9a-f]{8}$"
)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return pid > 0
    return True


def remove_stale_temporaries(folder, names=None) -> list[Path]:
    """Delete the temporary files (:func:`temporary_path`) in ``folder`` whose writer is gone.

    Files of a process still running on this machine are kept (another run into the same folder).

    Args:
        folder: the folder.
        names: only temporaries of these output file names (other hosts' shards write into the
            same folder, and their process ids mean nothing here); None: every temporary.

    Returns:
        The paths removed.
    """
    prefixes = None if names is None else tuple(_temporary_prefix(n) for n in names)
    removed = []
    for item in sorted(Path(folder).iterdir()) if Path(folder).is_dir() else []:
        match = _TEMPORARY.match(item.name)
        if not match or not item.is_file():
            continue
        if prefixes is not None and not item.name.startswith(prefixes):
            continue
        if match["pid"] and _process_alive(int(match["pid"])):
            continue
        item.unlink(missing_ok=True)
        removed.append(item)
    return removed


def json_safe(value):
    """``value`` with non-finite floats as None and dict keys as strings, for strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


@contextlib.contextmanager
def atomic_path(path) -> Iterator[Path]:
    """A temporary path beside ``path`` (:func:`temporary_path`) that becomes ``path`` on success.

    The caller writes the file at the yielded path; when the block ends without an exception it is
    renamed onto ``path`` (``os.replace``), otherwise it is removed.

    Raises:
        VerseFormatError: ``path``'s folder does not exist.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise VerseFormatError(f"{path}: folder {path.parent} does not exist")
    temporary = temporary_path(path)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def write_text_atomic(path, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    with atomic_path(path) as temporary:
        temporary.write_text(text)


def write_bytes_atomic(path, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)


@contextlib.contextmanager
def atomic_directory(path, *, complete: str | None = None) -> Iterator[Path]:
    """A temporary folder beside ``path`` that becomes ``path`` when the block succeeds.

    An existing ``path`` is replaced (moved aside, then deleted), unless ``complete`` is given:
    then ``path`` is created only if absent (or an empty folder), and losing that race to another
    writer is no error when the winner's folder holds the file ``complete``.

    Args:
        path: the folder to create (its parent is created if needed).
        complete: name of the file that marks a finished folder (e.g. ``"meta.json"``).

    Yields:
        The temporary folder to fill (``.<name>.tmp-<random>``); removed if the block fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    temporary.mkdir()
    try:
        yield temporary
        if complete is not None:
            try:
                os.rename(temporary, path)
            except OSError:
                if not (path / complete).is_file():  # not a lost race with another writer
                    raise
            return
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(path, old)
        os.rename(temporary, path)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary)
