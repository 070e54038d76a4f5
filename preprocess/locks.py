"""An exclusive, advisory lock on an output directory for the life of a job.

`fcntl.flock` on a file in the directory: the kernel releases it when the
holder exits in any way (kill -9 included), so a lock is never stale. The
file itself stays (removing it would race with a job taking it) and names the
last holder, for the error message. flock works on local filesystems; on NFS
it depends on the mount, on object stores not at all (say so in README).
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

from preprocess.errors import DataError

LOCK_FILE = ".lock"


class DirectoryLocked(Exception):
  """Another live process holds the directory's lock."""


def _holder(lock_path: Path) -> str:
  try:
    info = json.loads(lock_path.read_text())
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
    return f"pid {info['pid']} on {info['host']} since {since}: {info['command']}"
  except (OSError, ValueError, KeyError, TypeError):
    return "a process that left no details"


@contextlib.contextmanager
def exclusive(directory: str | Path, job: str) -> Iterator[Path]:
  """Holds DIRECTORY/.lock for the block (the directory is created if absent).
  DirectoryLocked, naming the holder, when another process has it; DataError
  when the directory cannot be created or written."""
  directory = Path(directory)
  lock_path = directory / LOCK_FILE
  try:
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise DataError(f"{directory}: cannot create or lock it ({e.strerror or e})") from None
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise DirectoryLocked(f"{directory} is in use by another {job} "
                            f"({_holder(lock_path)}); wait for it to finish or use "
                            "another directory") from None
    details = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                          "since": time.time(), "command": " ".join(sys.argv)[:500]})
    os.ftruncate(fd, 0)
    os.pwrite(fd, details.encode(), 0)
    yield lock_path
  finally:
    os.close(fd)  # closing the descriptor releases the flock
