"""Atomic file writes: a crash mid-write leaves the previous file, never a half-written one.

Each write goes to a temporary file beside its target, named after the target, this host and
this process (``.adapter_model.safetensors.host-1234.x8f2.tmp``), then is renamed over the target.
A temporary file that a killed process left behind is removed by the next write in that folder
on that host. Files get the mode a plain ``open`` gives (``0o666`` less the umask).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

PathLike = str | os.PathLike
Writer = Callable[[Path], None]
_TEMPORARY = re.compile(r"^\.(?P<target>.+)\.(?P<host>[^.]+)-(?P<pid>\d+)\.[^.]+\.tmp$")


def atomic_write(path: PathLike, write: Writer) -> None:
    """Call ``write`` on a temporary path beside ``path``, make it durable, then rename it over ``path``."""
    atomic_write_all({path: write})


def atomic_write_all(writers: dict[PathLike, Writer]) -> None:
    """Write several files, each atomically, renaming them into place only once every one is written.

    A failure while writing (a full disk, say) leaves all the previous files as they were.
    """
    staged: list[tuple[Path, Path]] = []
    try:
        for path, write in writers.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(path.parent)
            tmp = _temporary_beside(path)
            staged.append((tmp, path))
            write(tmp)
            _make_durable(tmp)
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise


def replace_folder(folder: PathLike, write: Writer, what: str, ours: Callable[[Path], bool]) -> Path:
    """Write a whole folder: ``write`` fills a temporary folder beside ``folder``, which then takes its place.

    A failure leaves the old folder as it was; success leaves no file of the old one (stale files
    beside new ones change what loaders read). A non-empty ``folder`` must be one that ``ours``
    recognises (an earlier export), so nobody loses a folder of their own to a mistyped path.
    """
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or (any(folder.iterdir()) and not ours(folder))):
        raise ValueError(f"{what} {folder} holds other files; give a new or empty folder, or one that an earlier "
                         "export wrote (it is replaced whole)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    new = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".new"))
    old = new.with_suffix(".old")
    try:
        write(new)
        for file in new.rglob("*"):
            if file.is_file():
                _make_durable(file)
        os.chmod(new, 0o777 & ~current_umask())
        if folder.exists():
            os.replace(folder, old)
        os.replace(new, folder)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        if old.exists() and not folder.exists():
            os.replace(old, folder)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return folder


def _temporary_beside(path: Path) -> Path:
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_host()}-{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    return Path(name)


def _make_durable(tmp: Path) -> None:
    """Flush ``tmp`` to disk and give it the mode a plain ``open`` would (mkstemp makes it private)."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~current_umask())


def current_umask() -> int:
    """The process's umask: from /proc where Linux gives it, else by setting and restoring it (no getter)."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"^Umask:\s*([0-7]+)", status, re.MULTILINE)[1], 8)
    except (OSError, TypeError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the temporary files in ``folder`` that a write of this library on this host left when killed."""
    removed = []
    for entry in folder.glob(".*.tmp"):
        match = _TEMPORARY.match(entry.name)
        if match and match["host"] == _host() and not _process_alive(int(match["pid"])):
            try:
                entry.unlink(missing_ok=True)
            except OSError:  # another user's leftover: not ours to remove, and no reason to fail this save
                continue
            removed.append(entry)
    return removed


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True
