"""A retrieval output directory: which entries are the job's own, and claiming it.

The job writes only these names (the layout of contracts/candidates.py, its
lock files, and the `.NAME.tmp-*` temporaries of its atomic writes):

  job.json  metrics.json  _SUCCESS  _SUCCESS-WWWWW-of-NNNNN.json
  .lock  .lock-claim  .lock-index  .lock-part-WWWWW-of-NNNNN
  index/items.faiss  index/index_info.json  index/labels.parquet
  candidates/part-WWWWW-of-NNNNN-BBBBBB.parquet

Anything else (another name, a symlink, a file where a folder belongs) is
foreign. A directory holding a foreign entry is not a retrieval output and
is refused whatever the flags, before anything is created in it, so a
mistyped --output_dir (a home folder, a trainer's model_dir) is never
written into; nor is a directory that holds the job's inputs. --overwrite
deletes only the names above, and never the lock files.

Claims are serialised by `.lock-claim`, held for the claim only (a
replacement's deletions included), so each claim sees a settled directory:
  - job.json equal to this job's: join it.
  - no job.json: write it and join (the directory holds nothing but locks
    and temporaries; results without a job.json are refused).
  - another job's (or an unreadable) job.json: if `.lock` cannot be taken
    exclusively, that job is running: refused at once, naming the last of
    its workers to join. Otherwise, when it left no result (no index_info,
    part, marker or metrics: it died building the index, say), this job
    takes the directory over; when it did, --overwrite replaces it, and
    without --overwrite the flags that differ are named.
Joining is holding `.lock` shared for the job's life (so a replacement waits
for no one: it is refused while any worker runs).
"""

import dataclasses
import json
import re
from pathlib import Path

from absl import logging

from contracts import locks
from contracts.candidates import (CANDIDATES_DIR, INDEX_DIR, JOB_FILE, LABELS_FILE, METRICS_FILE,
                                  SUCCESS_FILE)
from contracts.errors import ConfigError, DataError
from contracts.fileio import check_directory_outside_inputs, remove_path, write_json_atomic
from retrieval.index import INDEX_FILE, INDEX_INFO_FILE

CLAIM_LOCK = ".lock-claim"
INDEX_LOCK = ".lock-index"
SHARE_LOCK_PREFIX = ".lock-"
_SHARE = r"\d{5}-of-\d{5}"
_LOCKS = re.compile(rf"\.lock(-claim|-index|-part-{_SHARE})?")
_TOP_FILES = re.compile(rf"{re.escape(JOB_FILE)}|{re.escape(METRICS_FILE)}|"
                        rf"{re.escape(SUCCESS_FILE)}(-{_SHARE}\.json)?")
_INDEX_FILES = re.compile("|".join(map(re.escape, (INDEX_FILE, INDEX_INFO_FILE, LABELS_FILE))))
_PART = re.compile(rf"part-{_SHARE}-\d{{6}}\.parquet")
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.tmp-\w+")  # fileio's and tempfile's temporaries
_UNREADABLE = "unreadable"


def part_prefix(worker: int, num_workers: int) -> str:
  return f"part-{worker:05d}-of-{num_workers:05d}"


def part_name(worker: int, num_workers: int, batch: int) -> str:
  return f"{part_prefix(worker, num_workers)}-{batch:06d}.parquet"


def success_name(worker: int, num_workers: int) -> str:
  return f"{SUCCESS_FILE}-{worker:05d}-of-{num_workers:05d}.json"


@dataclasses.dataclass
class Contents:
  """What an output directory holds, by kind."""
  foreign: list[str] = dataclasses.field(default_factory=list)  # relative names
  results: list[str] = dataclasses.field(default_factory=list)  # what a run produced
  removable: list[Path] = dataclasses.field(default_factory=list)  # own, but job.json and locks
  has_job: bool = False


def _own_file(entry: Path, pattern: re.Pattern) -> str:
  """'file' when `entry` is a regular file named by `pattern`, 'temporary'
  when it is the temporary of one, '' otherwise."""
  if entry.is_symlink() or not entry.is_file():
    return ""
  if pattern.fullmatch(entry.name):
    return "file"
  temporary = _TEMPORARY.fullmatch(entry.name)
  return "temporary" if temporary and pattern.fullmatch(temporary["name"]) else ""


def survey(out: Path) -> Contents:
  """Sorts the entries of the existing directory `out` (one level into index/
  and candidates/)."""
  contents = Contents()
  for entry in sorted(out.iterdir()):
    name = entry.name
    if name in (INDEX_DIR, CANDIDATES_DIR) and entry.is_dir() and not entry.is_symlink():
      pattern = _INDEX_FILES if name == INDEX_DIR else _PART
      for child in sorted(entry.iterdir()):
        kind = _own_file(child, pattern)
        if not kind:
          contents.foreign.append(f"{name}/{child.name}")
          continue
        contents.removable.append(child)
        if kind == "file" and child.name != INDEX_FILE and child.name != LABELS_FILE:
          contents.results.append(f"{name}/{child.name}")  # index_info.json, parts
    elif _own_file(entry, _LOCKS) == "file":
      continue
    elif (kind := _own_file(entry, _TOP_FILES)):
      if kind == "file" and name == JOB_FILE:
        contents.has_job = True
        continue
      contents.removable.append(entry)
      if kind == "file":
        contents.results.append(name)
    else:
      contents.foreign.append(name)
  return contents


def _shown(names: list[str]) -> str:
  more = f" and {len(names) - 5} more" if len(names) > 5 else ""
  return ", ".join(names[:5]) + more


def check_output_dir(out: Path, inputs: tuple[Path | str, ...]) -> None:
  """Refuses (DataError), creating nothing, an --output_dir that is a file,
  holds one of the job's `inputs`, or is not a retrieval output."""
  out = Path(out).absolute()
  check_directory_outside_inputs(out, inputs, f"--output_dir={out}")
  if out.is_dir():
    _refuse_unknown(out, survey(out))


def _refuse_unknown(out: Path, contents: Contents) -> None:
  if contents.foreign:
    raise DataError(f"--output_dir={out}: not a retrieval output: holds {_shown(contents.foreign)}"
                    ", which retrieval never writes; choose another --output_dir (--overwrite "
                    "replaces only a retrieval output)")
  if contents.results and not contents.has_job:
    raise DataError(f"--output_dir={out}: holds {_shown(contents.results)} but no {JOB_FILE}, "
                    "so which job wrote them is unknown; remove them yourself or choose another "
                    "--output_dir")


def read_job(job: Path) -> dict | None:
  """job.json's stamp; None when absent; {_UNREADABLE: why} when it does not parse."""
  try:
    stamp = json.loads(job.read_text())
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    return {_UNREADABLE: str(e)}
  return stamp if isinstance(stamp, dict) else {_UNREADABLE: "not a JSON object"}


def claim(out: Path, stamp: dict, overwrite: bool) -> locks.LockFile:
  """Claims `out` (see the module docstring) for the job `stamp`; returns
  `.lock` held shared, which the caller holds for the job's life."""
  out = Path(out).absolute()
  claim_lock = locks.LockFile(out / CLAIM_LOCK, "retrieval job", str(out))
  try:
    if not claim_lock.try_take():
      logging.info("%s: waiting for %s, which is claiming or replacing this output", out,
                   claim_lock.holder())
      claim_lock.wait()
    job_lock = locks.LockFile(out / locks.LOCK_FILE, "retrieval job", str(out))
    try:
      _claim_locked(out, stamp, overwrite, job_lock)
    except BaseException:
      job_lock.close()
      raise
    return job_lock
  finally:
    claim_lock.close()


def _claim_locked(out: Path, stamp: dict, overwrite: bool, job_lock: locks.LockFile) -> None:
  contents = survey(out)
  _refuse_unknown(out, contents)  # again: the directory may have changed since the check
  job = out / JOB_FILE
  previous = read_job(job)
  if previous is None:
    write_json_atomic(job, stamp)
  elif previous != stamp:
    if _UNREADABLE in previous:
      other = f"an unreadable {JOB_FILE} ({previous[_UNREADABLE]})"
    else:
      changed = sorted(k for k in set(stamp) | set(previous) if stamp.get(k) != previous.get(k))
      other = f"output of a different retrieval job (differs in {', '.join(changed)})"
    if not job_lock.try_take(shared=False):
      raise locks.DirectoryLocked(f"{out}: holds {other}, which is running there "
                                  f"({job_lock.holder()}); wait for it to finish or choose "
                                  "another --output_dir")
    try:
      if contents.results and not overwrite:
        if _UNREADABLE in previous:
          raise DataError(f"{job}: unreadable ({previous[_UNREADABLE]}); pass --overwrite to "
                          "replace this output, or delete it")
        raise ConfigError(f"{out}: holds {other}; pass --overwrite to replace it")
      for path in contents.removable:
        remove_path(path)
      write_json_atomic(job, stamp)
    except BaseException:
      job_lock.release()
      raise
    logging.info("%s: %s the output of another retrieval job", out,
                 "replaced (--overwrite)" if contents.results else "took over (it had no "
                 "results)")
  if not job_lock.try_take(shared=True):  # only claims take it exclusively, and we hold those
    raise job_lock.locked_error()
  job_lock.record_holder()
