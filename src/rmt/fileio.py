"""Writing files so that a crash or a kill never leaves a half-written one in place.

Every temporary file or folder is named ``.NAME.tmp.PID@HOST.RANDOM`` (or ``.old.`` for a folder being swapped out):
the writer's process id and host are in the name, so a later run can tell a leftover of a writer that died
(``kill -9``, power loss) from one that is still writing, and remove only the former (``remove_orphans``).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rmt.errors import RMTError

log = logging.getLogger(__name__)

_UMASK = os.umask(0o022)
os.umask(_UMASK)
_HOST = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "host"
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)\.(?P<pid>\d+)@(?P<host>[A-Za-z0-9_.-]+)\.(?P<rand>[A-Za-z0-9_]+)$")


def temp_prefix(name: str, kind: str = "tmp") -> str:
    """Prefix for ``tempfile.mkdtemp``/``mkstemp`` beside ``name``: ``.NAME.tmp.PID@HOST.`` (the random part follows)."""
    return f".{name}.{kind}.{os.getpid()}@{_HOST}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def is_orphan(path: str | Path) -> bool:
    """True for a temporary file or folder of ours whose writer, on this host, is no longer running."""
    m = _TEMP_NAME.match(Path(path).name)
    return bool(m) and m["host"] == _HOST and int(m["pid"]) != os.getpid() and not _alive(int(m["pid"]))


def remove_orphans(folder: str | Path, name: str | None = None) -> list[Path]:
    """Delete the leftovers of dead writers in ``folder`` (only those of ``name`` when given); returns them.

    Temporary entries of a live writer, of another host, or not named by ``temp_prefix`` are never touched.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.iterdir():
        m = _TEMP_NAME.match(p.name)
        if m is None or (name is not None and m["name"] != name) or not is_orphan(p):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    if removed:
        log.info("removed %d leftover temporary file(s) of interrupted writes in %s", len(removed), folder)
    return removed


def swap_into_place(new: Path, target: Path) -> None:
    """Rename the finished folder ``new`` to ``target``; an existing ``target`` is moved aside first and deleted
    only once ``new`` is in place, so some complete version exists at every moment."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=temp_prefix(target.name, "old"), dir=target.parent))
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def exclusive(lock_file: str | Path, work: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_file`` (made if missing) for the block, so that one process at a time
    does ``work``; another waits for it (saying so once) and then finds that work done. The kernel releases the lock
    when its holder ends, however it ends."""
    lock_file = Path(lock_file)
    try:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        fh = open(lock_file, "a")
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        # a folder this user may read but not write (a shared, finished corpus): work that only reads needs no lock
        log.warning("cannot create the lock %s (%s); going on without it", lock_file, e.strerror or e)
        yield
        return
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process %s (lock %s)", work, lock_file)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextmanager
def naming_errors(path: str | Path) -> Iterator[None]:
    """Re-raise an OSError that does not say which file it is about (a full disk during ``write``) with ``path``."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None
        raise


def disk_full_error(path: str | Path, cause: BaseException, min_free: int = 16 << 20) -> OSError | None:
    """An ENOSPC OSError naming ``path`` when a library's failed write (torch, safetensors: not an OSError) happened
    on a disk with less than ``min_free`` bytes left; None when the disk has room (the cause is something else)."""
    if isinstance(cause, OSError) or not isinstance(cause, Exception):
        return None
    try:
        free = shutil.disk_usage(Path(path).parent if not Path(path).exists() else path).free
    except OSError:
        return None
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) if free < min_free else None


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path`` (atomic on POSIX)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private; an ordinary file is what was asked for
        with naming_errors(path), os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _files_under(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())


def source_stamp(path: str | Path) -> list:
    """Size and modification time of a corpus file, or of each file under a corpus folder (by relative name): a
    change that needs no reading to see. Equal stamps are taken as the same contents (as ``make`` does)."""
    path = Path(path)
    return [[str(f.relative_to(path)) if f != path else "", f.stat().st_size, f.stat().st_mtime_ns] for f in _files_under(path)]


def source_digest(path: str | Path) -> str:
    """SHA-256 of a corpus file's bytes, or of each file's relative name and bytes under a corpus folder: whether
    the contents changed when the stamp did (a file copied or written again with the same bytes has not)."""
    import hashlib

    path = Path(path)
    h = hashlib.sha256()
    for f in _files_under(path):
        h.update(f"{f.relative_to(path) if f != path else ''}\0{f.stat().st_size}\0".encode())
        with open(f, "rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


OWN_FILE_MAX_BYTES = 64 << 20  # larger than any results file the tools write: a file above it is not one of theirs


def check_replaceable(path: str | Path, what: str, ours) -> None:
    """Before any work: a file already at ``path`` is one the tools wrote (``ours(text)`` is true of its text), so
    writing over it loses nothing of the user's. A corpus, a question file or any other file named by mistake is
    refused, and left as it is."""
    path = Path(path)
    if not path.is_file():
        return
    try:
        with open(path, "rb") as fh:
            head = fh.read(OWN_FILE_MAX_BYTES + 1)
        mine = len(head) <= OWN_FILE_MAX_BYTES and bool(ours(head.decode("utf-8")))
    except (OSError, UnicodeDecodeError, ValueError):
        mine = False
    if not mine:
        raise RMTError(f"{what} {path} exists and is not a file rmt wrote; choose another path (the file is left as it is)")


def read_json_object(path: str | Path) -> dict | None:
    """The JSON object in ``path``; None when the file is missing, unreadable, not JSON or not an object (each caller
    says what that means for its own file)."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, OSError):
        return None
    return value if isinstance(value, dict) else None


def json_object_with(text: str, *keys: str) -> bool:
    """Whether ``text`` is a JSON object holding every one of ``keys`` (how the tools recognise their own results)."""
    value = json.loads(text)
    return isinstance(value, dict) and all(k in value for k in keys)


def check_writable(path: str | Path, what: str = "output") -> None:
    """Fail before any work when the file ``path`` could not be written (its folder is made if missing)."""
    path = Path(path)
    if path.is_dir():
        raise RMTError(f"{what} {path} is a folder; give the path of a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), dir=path.parent)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        where = e.filename if e.filename is not None else path.parent
        raise RMTError(f"cannot write {what} {path}: {e.strerror or e} ({where})") from None
