"""Atomic outputs: a job's results appear complete or not at all.

Directories are built in a hidden temporary sibling (same filesystem, so the
final `os.rename` is atomic) and files are written to a temporary name and
renamed. A failure, Ctrl-C or SIGTERM removes the temporary sibling; what a
kill -9 leaves (`.NAME.tmp-*`, `.NAME.old-*`) the next run of the job on the
same output removes, under `locked_output`'s lock.
"""

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from contracts import locks
from contracts.errors import DataError


def is_nonempty_dir(path: Path) -> bool:
  return path.is_dir() and any(path.iterdir())


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
  """Turns SIGTERM into SystemExit so `finally` blocks clean up temporaries."""

  def handler(signum, frame):
    del frame
    raise SystemExit(128 + signum)

  try:
    previous = signal.signal(signal.SIGTERM, handler)
  except ValueError:  # not the main thread: leave signals alone
    yield
    return
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


def check_directory_outside_inputs(directory: Path, inputs: tuple[Path | str, ...],
                                   label: str) -> None:
  """Refuses (DataError, the message starting with `label`) an output
  `directory` that is a file, or that is or holds one of the job's `inputs`
  (replacing or clearing it could delete them)."""
  if directory.exists() and not directory.is_dir():
    raise DataError(f"{label}: exists and is not a directory")
  resolved = directory.resolve()
  for path in inputs:
    path = Path(path).resolve()
    if path == resolved or resolved in path.parents:
      raise DataError(f"{label}: holds the input {path}, which replacing it would delete; "
                      "choose an output directory outside the inputs")


def check_replaceable(final_dir: Path | str, overwrite: bool, own_file: str | None = None,
                      inputs: tuple[Path | str, ...] = (), job: str = "preprocess") -> None:
  """Refuses (DataError) to replace `final_dir` when it is a file, holds one of
  the job's `inputs`, or is not empty and either `overwrite` is off or it is
  not this job's output (no `own_file` in it; None: any directory is)."""
  final_dir = Path(final_dir).absolute()
  check_directory_outside_inputs(final_dir, inputs, f"{final_dir}")
  if not is_nonempty_dir(final_dir):
    return
  if not overwrite:
    raise DataError(f"{final_dir}: output directory exists and is not empty "
                    "(pass --overwrite to replace it)")
  if own_file and not (final_dir / own_file).is_file():
    names = sorted(p.name for p in final_dir.iterdir())
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    raise DataError(f"{final_dir}: --overwrite refused: it is not a {job} output (no {own_file}) "
                    f"and holds {shown}; remove it yourself or choose another output directory")


def output_lock_path(final_dir: Path | str) -> Path:
  """The lock of a directory replaced by rename: a hidden sibling, `.NAME.lock`."""
  final_dir = Path(final_dir).absolute()
  return final_dir.parent / f".{final_dir.name}.lock"


@contextlib.contextmanager
def locked_output(final_dir: Path | str, job: str) -> Iterator[None]:
  """Holds the output's sibling lock for the block: a second job writing the
  same output is refused (locks.DirectoryLocked) instead of racing it to the
  rename. Under the lock, the temporaries of killed runs are removed; the
  parent folder is created, so an unwritable location fails here, before any
  input is read."""
  final_dir = Path(final_dir).absolute()
  with locks.exclusive_file(output_lock_path(final_dir), job, final_dir, remove=True):
    for pattern in (f".{final_dir.name}.tmp-*", f".{final_dir.name}.old-*"):
      for stale in final_dir.parent.glob(pattern):
        remove_path(stale)
    yield


def remove_path(path: Path) -> None:
  """Deletes a file or a directory tree (a symlink itself, not what it points to)."""
  if path.is_dir() and not path.is_symlink():
    shutil.rmtree(path, ignore_errors=True)
  else:
    path.unlink(missing_ok=True)


@contextlib.contextmanager
def output_errors(final_dir: Path | str) -> Iterator[None]:
  """Turns an OSError raised while the output is written (a full disk, a
  read-only or vanished filesystem) into a one-line DataError naming the
  output. Put it outside `atomic_directory`, whose cleanup runs first."""
  try:
    yield
  except OSError as e:
    raise DataError(f"{Path(final_dir).absolute()}: cannot write the output "
                    f"({os_error_reason(e)}); nothing was written and any previous output is "
                    "unchanged") from None


def os_error_reason(e: OSError) -> str:
  """The system's words for an OSError (pyarrow's carry the errno only in the text)."""
  if e.strerror:
    return e.strerror
  found = re.search(r"\[errno (\d+)\]", str(e))
  return os.strerror(int(found.group(1))) if found else str(e)


@contextlib.contextmanager
def atomic_directory(final_dir: Path | str, overwrite: bool = False, own_file: str | None = None,
                     inputs: tuple[Path | str, ...] = (), job: str = "preprocess"
                     ) -> Iterator[Path]:
  """Yields a temporary directory that replaces `final_dir` on success.

  `check_replaceable` first: an existing non-empty `final_dir` is replaced only
  with `overwrite` and, when `own_file` is given, only if it holds that file
  (it is this job's output); never when it holds one of `inputs`. On any
  exception the temporary directory is deleted and `final_dir` is left
  exactly as it was.
  """
  final_dir = Path(final_dir).absolute()
  check_replaceable(final_dir, overwrite, own_file, inputs, job)
  final_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp_dir = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.tmp-", dir=final_dir.parent))
  try:
    with _sigterm_as_exit():
      yield tmp_dir
      # Default mkdtemp mode is 0700; give the output the usual permissions.
      os.chmod(tmp_dir, 0o755)
      if final_dir.exists():
        old_dir = final_dir.parent / f".{final_dir.name}.old-{os.getpid()}"
        os.rename(final_dir, old_dir)
        os.rename(tmp_dir, final_dir)
        shutil.rmtree(old_dir, ignore_errors=True)
      else:
        os.rename(tmp_dir, final_dir)
  finally:
    if tmp_dir.exists():
      shutil.rmtree(tmp_dir, ignore_errors=True)


def write_bytes_atomic(path: Path | str, data: bytes) -> None:
  """Writes `data` to `path` through a temporary sibling and a rename."""
  path = Path(path)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


def write_parquet_atomic(path: Path | str, table: pa.Table) -> None:
  """One Parquet file, built in memory and renamed into place whole."""
  buffer = pa.BufferOutputStream()
  pq.write_table(table, buffer)
  write_bytes_atomic(path, buffer.getvalue().to_pybytes())


def write_json_atomic(path: Path | str, obj: Any) -> None:
  write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def sha256_file(path: Path | str, chunk_bytes: int = 1 << 22) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(chunk_bytes):
      digest.update(chunk)
  return digest.hexdigest()
