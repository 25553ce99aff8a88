"""One owner per output folder: a run's folder is held by one process at a time.

A holder keeps an OS lock (flock) on a lock file inside the folder for as long as it runs. The
operating system drops that lock when the process ends, however it ends (kill -9 included), so
a crashed run never leaves a stale lock behind and its resume is never blocked. The file's
text (pid, host, start time) is only there to name the holder to a process that is refused.

    with hold(out_dir, "training run"):
        ...  # nothing else writes into out_dir before this point

Under torchrun only rank 0 takes the lock: the ranks of one run share its folder.
"""

import contextlib
import datetime
import fcntl
import json
import os
import socket
from pathlib import Path

from model import UserError

LOCK_FILE = ".lock"  # a run's folder: train.py, finetune.py, e2e_eval.py
STUDY_LOCK_FILE = ".study.lock"  # a study's folder, whose sub-folders its steps lock with LOCK_FILE

_held: dict[Path, int] = {}  # lock file -> fd, for the folders this process holds


def _describe(lock: Path) -> str:
    """The holder as its lock file names it; a file torn by a holder that is just starting says so."""
    try:
        info = json.loads(lock.read_text())
        return f"pid {info['pid']} on {info['host']}, since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that is just starting"


def _make_folder(folder: Path) -> bool:
    """Create `folder` (and its parents) if missing; True when it was made now."""
    if folder.is_dir():
        return False
    for parent in (folder, *folder.parents):
        if parent.exists() and not parent.is_dir():
            raise UserError(f"cannot use {folder} as a folder: {parent} is a file")
    try:
        folder.mkdir(parents=True)
    except FileExistsError:  # made by another process in the meantime
        return False
    except OSError as e:
        raise UserError(f"cannot create the folder {folder}: {e.strerror or e}") from None
    return True


def _try_lock(lock: Path) -> int | None:
    """An fd holding the lock on `lock`, or None when another process holds it."""
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise UserError(f"cannot open the lock file {lock}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        # the file may have been removed and made anew since we opened it: lock the one at the path
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def holder(folder) -> str | None:
    """Who holds `folder`, when another process does (a look that writes nothing)."""
    lock = Path(os.path.realpath(folder)) / LOCK_FILE
    if lock in _held:
        return None
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None  # no lock file: nobody has held the folder yet
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return _describe(lock)
    finally:
        os.close(fd)  # closing drops the shared lock taken to look


@contextlib.contextmanager
def hold(folder, what: str, lock_name: str = LOCK_FILE):
    """Hold `folder` (made if missing) for the `with` block, or stop in one line naming its holder.

    A folder made here that is left holding nothing but the lock file is removed at the end, so
    that a run refused for another reason (bad data, say) leaves nothing behind."""
    if int(os.environ.get("RANK", 0)) != 0:  # torchrun: rank 0 holds the folder for the run
        yield
        return
    shown, folder = folder, Path(os.path.realpath(folder))
    made = _make_folder(folder)
    lock = folder / lock_name
    fd = _try_lock(lock)
    if fd is None:
        raise UserError(f"{shown} is in use by another {what} ({_describe(lock)}): wait for it to end, stop "
                        f"it, or choose another folder")
    since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    os.ftruncate(fd, 0)
    os.write(fd, (json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}) + "\n").encode())
    _held[lock] = fd
    try:
        yield
    finally:
        del _held[lock]
        if made and [p.name for p in folder.iterdir()] == [lock_name]:
            with contextlib.suppress(OSError):  # another process may have taken the folder since
                lock.unlink()
                folder.rmdir()
        os.close(fd)  # the lock ends here, or with the process
