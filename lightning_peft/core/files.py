"""Atomic file writes: a crash mid-write leaves the previous file, never a half-written one.

Each write goes to a temporary file beside its target, named after the target, this host and
this process (``.adapter_model.safetensors.host-1234.x8f2.tmp``), then is renamed over the target.
A temporary file (or an export's staging folder, ``.export.host-1234.x8f2.tmp``) that a killed
process left behind is removed by the next write in that folder on that host. Files get the
mode a plain ``open`` gives (``0o666`` less the umask).
"""

from __future__ import annotations

import json
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


EXPORT_LIST = ".lightning-peft-files"  # in an export's folder: the files it wrote, which the next export replaces


def write_export(folder: PathLike, write: Writer, what: str, loads: Callable[[str], bool]) -> Path:
    """Write an export's files into ``folder`` so that a failure changes nothing and no stale file stays.

    ``write`` fills a staging folder inside ``folder`` (the same disk, whatever links or mounts
    lead there); only once it is whole are its files renamed into place, and the files that the
    previous export listed but this one does not write are removed. Other files (the user's own)
    stay; one that a loader reads (``loads(name)``: an ``adapter_config.json``, model weights) and
    no export of ours wrote is refused, since a loader would read it beside the new files.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{what} {folder} is a file; give a folder (new or existing)")
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    previous = _export_list(folder)
    remove_stale_temporaries(folder)
    stage = Path(tempfile.mkdtemp(dir=folder, prefix=f".export.{_host()}-{os.getpid()}.", suffix=".tmp"))
    try:
        write(stage)
        written = sorted(p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file())
        _refuse_strangers(folder, {*previous, *written}, what, loads)
        for name in written:  # all on disk before the first rename: a full disk seen at a flush changes nothing
            _make_durable(stage / name)
        for name in written:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage / name, folder / name)
        for name in sorted(set(previous) - set(written)):
            (folder / name).unlink(missing_ok=True)
            _remove_empty_parents(folder / name, folder)
        atomic_write(folder / EXPORT_LIST, lambda tmp: tmp.write_text(json.dumps(written, indent=0)))
    except BaseException:
        shutil.rmtree(folder if created else stage, ignore_errors=True)  # a folder made for this export goes too
        raise
    shutil.rmtree(stage, ignore_errors=True)
    return folder


def _export_list(folder: Path) -> list[str]:
    """The files that the previous export into ``folder`` wrote (none: no export, or an unreadable list)."""
    try:
        names = json.loads((folder / EXPORT_LIST).read_text())
    except (OSError, ValueError):
        return []
    return [n for n in names if isinstance(n, str) and ".." not in Path(n).parts and not Path(n).is_absolute()]


def _refuse_strangers(folder: Path, ours: set[str], what: str, loads: Callable[[str], bool]) -> None:
    """Refuse a file that a loader of ``folder`` would read and no export of ours wrote."""
    for path in folder.iterdir():
        name = path.name
        if path.is_file() and loads(name) and name not in ours:
            raise ValueError(f"{what} {folder} holds {name}, which no lightning-peft export wrote and a loader would "
                             "read beside the new files; remove it, or give another folder")


def _remove_empty_parents(path: Path, top: Path) -> None:
    """Remove ``path``'s parent folders up to ``top`` (not included) while they are empty."""
    parent = path.parent
    while parent != top and top in parent.parents:
        try:
            parent.rmdir()
        except OSError:
            return
        parent = parent.parent


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
    """Remove the temporary files (and an export's staging folders) in ``folder`` that a write of this library on
    this host left when killed."""
    removed = []
    for entry in folder.glob(".*.tmp"):
        match = _TEMPORARY.match(entry.name)
        if match and match["host"] == _host() and not _process_alive(int(match["pid"])):
            try:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink(missing_ok=True)
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
