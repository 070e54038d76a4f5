"""Advisory locks on output directories for the life of a job.

`fcntl.flock` on a lock file: the kernel releases it when the holder exits in
any way (kill -9 included), so a lock is never stale. The file names the last
holder, for the error message; it stays, except for `exclusive_file(...,
remove=True)`, whose takers check after locking that the file they locked is
still the one at the path. flock works on local filesystems; on NFS it depends on
the mount, on object stores not at all (README says so).

- `exclusive(dir, job)`: DIR/.lock, one holder (trainer model_dir).
- `exclusive_file(path, job, what)`: any lock file, one holder (a preprocess
  output, locked through a sibling file because the directory itself is
  replaced by a rename, and removed at the end; one retrieval worker's share).
  A file removed on release is checked after locking to still be the one at
  its path, so a removal never lets two holders in.
- `LockFile`: shared or exclusive, converted while held (the retrieval
  output: every worker of one job shares it; replacing another job's output
  takes it exclusively, which only succeeds when no worker of any job runs).
"""

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from contracts.errors import DataError

LOCK_FILE = ".lock"


class DirectoryLocked(DataError):
  """Another live process holds the lock."""


def _holder(lock_path: Path) -> str:
  try:
    info = json.loads(lock_path.read_text())
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
    return f"pid {info['pid']} on {info['host']} since {since}: {info['command']}"
  except (OSError, ValueError, KeyError, TypeError):
    return "a process that left no details"


class LockFile:
  """An open lock file; `take` converts between shared and exclusive."""

  def __init__(self, path: Path | str, job: str, what: str):
    self.path, self.job, self.what = Path(path), job, what
    if self.path.parent.exists() and not self.path.parent.is_dir():
      raise DataError(f"{self.path.parent}: exists and is not a directory")
    self._fd = self._open()

  def _open(self) -> int:
    try:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise DataError(f"{self.path.parent}: cannot create or lock it "
                      f"({e.strerror or e})") from None

  def _is_current(self) -> bool:
    """Whether the locked file is still the one at `path` (a holder that
    removes its lock file on release may have unlinked it meanwhile)."""
    try:
      here, there = os.fstat(self._fd), os.stat(self.path)
    except FileNotFoundError:
      return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)

  def try_take(self, shared: bool = False) -> bool:
    """Takes (or converts to) the lock without waiting; False when another holds it.
    A failed conversion leaves this process holding nothing (flock's rule)."""
    while True:
      try:
        fcntl.flock(self._fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
      except BlockingIOError:
        return False
      if self._is_current():
        break
      os.close(self._fd)
      self._fd = self._open()
    if not shared:
      self._write_details()
    return True

  def record_holder(self) -> None:
    """Names this process in the file, as an exclusive take does; for a
    shared holder, whose takers must be serialised (concurrent writers could
    garble it), so that a refused job can name the one running."""
    self._write_details()

  def remove(self) -> None:
    """Unlinks the lock file while holding it exclusively, then releases it."""
    with contextlib.suppress(FileNotFoundError):
      os.unlink(self.path)
    self.close()

  def take(self, shared: bool = False) -> None:
    if not self.try_take(shared):
      raise self.locked_error()

  def wait(self) -> None:
    """Takes the lock exclusively, waiting for the holder."""
    fcntl.flock(self._fd, fcntl.LOCK_EX)
    self._write_details()

  def release(self) -> None:
    fcntl.flock(self._fd, fcntl.LOCK_UN)

  def close(self) -> None:
    os.close(self._fd)  # closing the descriptor releases the flock

  def holder(self) -> str:
    """The last holder named in the file: pid, host, since when, command."""
    return _holder(self.path)

  def locked_error(self) -> DirectoryLocked:
    return DirectoryLocked(f"{self.what} is in use by another {self.job} "
                           f"({self.holder()}); wait for it to finish or use another "
                           "directory")

  def _write_details(self) -> None:
    details = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                          "since": time.time(), "command": " ".join(sys.argv)[:500]})
    try:
      os.ftruncate(self._fd, 0)
      os.pwrite(self._fd, details.encode(), 0)
    except OSError:  # a full disk: the lock holds, only the holder's details are lost
      pass


@contextlib.contextmanager
def exclusive_file(path: Path | str, job: str, what: str | Path,
                   remove: bool = False) -> Iterator[Path]:
  """Holds the lock file `path` for the block (its folder is created if absent).
  DirectoryLocked, naming the holder, when another process has it; DataError
  when the folder cannot be created or written. With `remove`, the file is
  deleted at the end of the block (a lock beside the output, not in it; a
  kill -9 leaves it, unlocked, for the next run to reuse)."""
  lock = LockFile(path, job, str(what))
  try:
    lock.take()
  except BaseException:
    lock.close()
    raise
  try:
    yield lock.path
  finally:
    lock.remove() if remove else lock.close()


def exclusive(directory: str | Path, job: str) -> contextlib.AbstractContextManager[Path]:
  """Holds DIRECTORY/.lock for the block (the directory is created if absent)."""
  return exclusive_file(Path(directory) / LOCK_FILE, job, directory)
