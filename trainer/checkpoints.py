"""The regular checkpoints of a model_dir (checkpoints/ckpt-N.*): which there
are, whether one can be read, and which one a run resumes from.

Which there are: the `checkpoint` state file (a text proto the
CheckpointManager rewrites after each save) lists them, oldest first. When
it is missing or not a state file while ckpt-N.index files are there, the
list is recovered from those files, so a run never restarts from step 0
beside its own checkpoints.

Whether one can be read: TensorFlow's bundle reader already checks every
byte a restore uses. The .index file is an SSTable with a CRC32C per block
(a flipped byte: "block checksum mismatch"; cut short: "not an sstable"),
and each tensor's entry in it holds the CRC32C of the tensor's bytes in the
data file, checked whenever the tensor is read (a flipped byte: "Checksum
does not match"; cut short: "Read less bytes than requested"). Reading every
tensor once with `tf.train.load_checkpoint` therefore verifies a checkpoint
before it is restored, and tells which file is damaged.

No TensorFlow at import: --mode=eval resolves its checkpoint among the
flag checks, before TensorFlow starts.
"""

import dataclasses
import re
from pathlib import Path

from contracts.fileio import write_bytes_atomic

STATE_FILE = "checkpoint"  # under checkpoints/: TensorFlow's CheckpointState text proto
_STATE_LINE = re.compile(r'^\s*(\w+)\s*:\s*(?:"((?:[^"\\]|\\.)*)"|[-+0-9.eE]+)\s*$')
_STATE_KEYS = ("model_checkpoint_path", "all_model_checkpoint_paths",
               "all_model_checkpoint_timestamps", "last_preserved_timestamp")
_INDEX_NAME = re.compile(r"^ckpt-(\d+)\.index$")


@dataclasses.dataclass
class Listing:
  prefixes: list[str]  # oldest first
  recovered: str = ""  # why the list comes from the ckpt-N.index files ("" : the state file)


class DamagedCheckpoint(Exception):
  """A checkpoint file that cannot be read: `path` names it, `reason` says how."""

  def __init__(self, path: str, reason: str):
    super().__init__(f"{path} is damaged ({reason})")
    self.path, self.reason = path, reason


def number(prefix: str) -> int:
  """N of .../ckpt-N (-1 for another name)."""
  tail = Path(prefix).name.rsplit("-", 1)[-1]
  return int(tail) if tail.isdigit() else -1


def _index_files(checkpoint_dir: Path) -> list[str]:
  """The ckpt-N prefixes with an index file, by N."""
  found = []
  for path in checkpoint_dir.glob("ckpt-*.index"):
    match = _INDEX_NAME.match(path.name)
    if match:
      found.append((int(match.group(1)), str(checkpoint_dir / f"ckpt-{match.group(1)}")))
  return [prefix for _, prefix in sorted(found)]


def _read_state(path: Path) -> tuple[list[str], str]:
  """(the prefixes the state file lists, oldest first; "" or what is wrong with it)."""
  try:
    text = path.read_text()
  except (OSError, UnicodeDecodeError) as e:
    return [], f"unreadable: {e}"
  latest, listed = None, []
  for number_, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    match = _STATE_LINE.match(line)
    if not match or match.group(1) not in _STATE_KEYS:
      return [], f"line {number_} is {line.strip()[:60]!r}"
    if match.group(1) == "model_checkpoint_path":
      latest = match.group(2)
    elif match.group(1) == "all_model_checkpoint_paths":
      listed.append(match.group(2))
  if not latest:
    return [], "it names no model_checkpoint_path"
  listed = [name for name in listed if name != latest] + [latest]
  return [name if Path(name).is_absolute() else str(path.parent / name) for name in listed], ""


def listed(checkpoint_dir: Path | str) -> Listing:
  """The regular checkpoints, oldest first: the state file's list, or the
  ckpt-N.index files when the state file is missing or garbage."""
  checkpoint_dir = Path(checkpoint_dir)
  state = checkpoint_dir / STATE_FILE
  if state.is_file():
    prefixes, problem = _read_state(state)
    if not problem:
      return Listing(prefixes)
    return Listing(_index_files(checkpoint_dir),
                   f"{state} is not a checkpoint state file ({problem})")
  on_disk = _index_files(checkpoint_dir)
  return Listing(on_disk, f"{state} is missing" if on_disk else "")


def write_state(checkpoint_dir: Path | str, prefixes: list[str]) -> None:
  """The state file listing `prefixes` (oldest first; the last is the latest),
  as the CheckpointManager writes it."""
  checkpoint_dir = Path(checkpoint_dir)
  names = [Path(p).name if Path(p).parent == checkpoint_dir else p for p in prefixes]
  lines = [f'model_checkpoint_path: "{names[-1]}"'] + \
      [f'all_model_checkpoint_paths: "{name}"' for name in names]
  write_bytes_atomic(checkpoint_dir / STATE_FILE, ("\n".join(lines) + "\n").encode())


def _reason(error: BaseException) -> str:
  """The error's first line without TensorFlow's op decorations, shortened."""
  text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  text = re.sub(r"\{\{[^}]*\}\}\s*", "", text)
  text = re.sub(r"\s*\[Op:\w+\]$", "", text)
  return text[:240]


def verify(prefix: str) -> None:
  """Reads every tensor of the checkpoint `prefix` (TensorFlow checks each
  one's CRC32C); DamagedCheckpoint naming the file that fails."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  index = prefix + ".index"
  if not Path(index).is_file():
    raise DamagedCheckpoint(index, "missing")
  data_files = sorted(Path(prefix).parent.glob(Path(prefix).name + ".data-*-of-*"))
  if not data_files:
    raise DamagedCheckpoint(prefix + ".data-00000-of-00001", "missing")
  try:
    reader = tf.train.load_checkpoint(prefix)
    names = list(reader.get_variable_to_dtype_map())
  except Exception as e:  # pylint: disable=broad-except
    raise DamagedCheckpoint(index, _reason(e)) from e
  for name in names:
    try:
      reader.get_tensor(name)
    except Exception as e:  # pylint: disable=broad-except
      raise DamagedCheckpoint(_data_file(prefix, data_files, str(e)), _reason(e)) from e


def _data_file(prefix: str, data_files: list[Path], message: str) -> str:
  """The data file a read error is about: its shard when the message says
  it, the only one when there is one."""
  shard = re.search(r"shard (\d+)", message)
  if shard:
    named = [p for p in data_files if p.name.startswith(
        f"{Path(prefix).name}.data-{int(shard.group(1)):05d}-of-")]
    if named:
      return str(named[0])
  return str(data_files[0]) if len(data_files) == 1 else prefix + ".data-*"


@dataclasses.dataclass
class ResumePoint:
  prefix: str | None  # the newest intact checkpoint; None: none intact (or none at all)
  listing: Listing
  damaged: list[DamagedCheckpoint]  # newer than `prefix`, newest first

  @property
  def intact(self) -> list[str]:
    """The listed checkpoints up to `prefix` (oldest first), the damaged ones left out."""
    if self.prefix is None:
      return []
    prefixes = self.listing.prefixes
    return prefixes[:prefixes.index(self.prefix) + 1]

  def describe_damage(self) -> str:
    return "; ".join(str(e) for e in self.damaged)


def newest_intact(checkpoint_dir: Path | str) -> ResumePoint:
  """The newest listed checkpoint that verifies, and the newer ones that do not."""
  listing = listed(checkpoint_dir)
  damaged = []
  for prefix in reversed(listing.prefixes):
    try:
      verify(prefix)
    except DamagedCheckpoint as e:
      damaged.append(e)
      continue
    return ResumePoint(prefix, listing, damaged)
  return ResumePoint(None, listing, damaged)
