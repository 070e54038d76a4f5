"""The data contract between `preprocess`, `trainer` and `retrieval`.

A preprocess output directory holds:

  manifest.json              this module's `Manifest`, the only entry point
  vocab/items.parquet        ITEM_COLUMNS, one row per item index (row 0 = padding)
  vocab/users.parquet        USER_COLUMNS, one row per user index (row 0 = padding)
  vocab/categories.parquet   CATEGORY_COLUMNS (row 0 = unknown)
  user_histories.parquet     HISTORY_COLUMNS, one row per user
  train/part-SSSSS-of-NNNNN.tfrecord[.gz]   tf.train.Example shards
  valid/..., test/...        evaluation examples, same features

Every example has the int64 features of `example_feature_shapes`: the user
index, the left-padded history of item indices (`max_seq_len` long, 0 =
padding), its length (real items, <= max_seq_len), the target item and the
target's category. Index 0 means padding or unknown in every vocabulary.

Jobs read a directory with `load(data_dir)`, which validates the schema
version and the presence of every referenced file; `Manifest.verify_shards`
checks shard sizes (and optionally SHA-256) so damage is reported by file name.
"""

import dataclasses
import datetime
import json
from pathlib import Path
from typing import Any, Mapping

from preprocess.errors import DataError
from preprocess.fileio import sha256_file, write_json_atomic

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
ITEMS_FILE = "vocab/items.parquet"
USERS_FILE = "vocab/users.parquet"
CATEGORIES_FILE = "vocab/categories.parquet"
USER_HISTORIES_FILE = "user_histories.parquet"

TRAIN = "train"
VALID = "valid"
TEST = "test"
# Holdout protocol -> evaluation splits it produces.
HOLDOUT_SPLITS = {"last": (VALID,), "valid_test": (VALID, TEST)}
# positions: one example per next-item target (the notebooks).
# windows: non-overlapping windows of max_seq_len targets; every train click
#   after a user's first is the target of exactly one window position.
SAMPLES = ("positions", "windows")
COMPRESSIONS = {"GZIP": ".tfrecord.gz", "NONE": ".tfrecord"}

FEATURE_USER = "user"
FEATURE_HISTORY = "history"
FEATURE_LENGTH = "length"
FEATURE_TARGET = "target"
FEATURE_TARGET_CATEGORY = "target_category"

# Parquet columns. Raw ids are int64 (null in the padding row); indices int32.
ITEM_COLUMNS = ("index", "item_id", "category", "category_id", "created_at_ts",
                "words_count", "train_clicks", "target_count")
USER_COLUMNS = ("index", "user_id", "num_clicks")
CATEGORY_COLUMNS = ("index", "category_id", "name", "num_items")
# history/history_ts: a user's training clicks in time order (list columns);
# valid_*/test_*: the held-out clicks (item 0 and ts null when the user has
# none). The test query history is history + [valid_item].
HISTORY_COLUMNS = ("user", "user_id", "history", "history_ts", "valid_item",
                   "valid_ts", "test_item", "test_ts")
# Users per Parquet row group of user_histories.parquet: batch jobs read
# their slice of users a row group at a time.
USER_HISTORIES_ROW_GROUP = 65536
# The items column the trainer uses for logQ correction: how often each item
# is a training target, i.e. how often it appears as an in-batch candidate.
ITEM_FREQUENCY_COLUMN = "target_count"


def example_feature_shapes(max_seq_len: int) -> dict[str, tuple[int, ...]]:
  """Feature name -> fixed shape of every tf.train.Example (all int64)."""
  return {
      FEATURE_USER: (),
      FEATURE_HISTORY: (max_seq_len,),
      FEATURE_LENGTH: (),
      FEATURE_TARGET: (),
      FEATURE_TARGET_CATEGORY: (),
  }


def shard_file_name(split: str, shard: int, num_shards: int, compression: str) -> str:
  return f"{split}/part-{shard:05d}-of-{num_shards:05d}{COMPRESSIONS[compression]}"


@dataclasses.dataclass(frozen=True)
class ShardInfo:
  path: str  # relative to the data directory
  num_examples: int
  bytes: int
  sha256: str


@dataclasses.dataclass(frozen=True)
class SplitInfo:
  num_examples: int
  shards: tuple[ShardInfo, ...]


@dataclasses.dataclass(frozen=True)
class Manifest:
  """What a preprocess output directory contains; see the module docstring."""
  source: Mapping[str, Any]  # type, inputs, time_unit
  flags: Mapping[str, Any]  # the preprocess configuration that produced it
  max_seq_len: int
  samples: str
  holdout: str
  compression: str  # key of COMPRESSIONS
  counts: Mapping[str, int]
  vocab_sizes: Mapping[str, int]  # items/users/categories, padding row included
  splits: Mapping[str, SplitInfo]
  schema_version: int = SCHEMA_VERSION
  created_at: str = ""
  # Where the manifest was loaded from; not serialised.
  data_dir: Path | None = dataclasses.field(default=None, compare=False)

  @property
  def eval_splits(self) -> tuple[str, ...]:
    return HOLDOUT_SPLITS[self.holdout]

  @property
  def feature_shapes(self) -> dict[str, tuple[int, ...]]:
    return example_feature_shapes(self.max_seq_len)

  @property
  def tfrecord_compression(self) -> str:
    """The `compression_type` argument for tf.data.TFRecordDataset."""
    return "" if self.compression == "NONE" else self.compression

  def path(self, relative: str) -> Path:
    if self.data_dir is None:
      raise ValueError("manifest was not loaded from a directory")
    return self.data_dir / relative

  def split(self, name: str) -> SplitInfo:
    if name not in self.splits:
      raise DataError(
          f"{self.path(MANIFEST_FILE)}: no split {name!r} (has {sorted(self.splits)}; "
          f"holdout={self.holdout})")
    return self.splits[name]

  def shard_paths(self, split: str) -> list[Path]:
    return [self.path(s.path) for s in self.split(split).shards]

  def verify_shards(self, split: str, checksums: bool = False) -> None:
    """Raises DataError naming the first shard that is missing or damaged."""
    for shard in self.split(split).shards:
      path = self.path(shard.path)
      if not path.is_file():
        raise DataError(f"{path}: shard listed in the manifest is missing")
      size = path.stat().st_size
      if size != shard.bytes:
        raise DataError(f"{path}: shard is {size} bytes, manifest says {shard.bytes} (damaged?)")
      if checksums and sha256_file(path) != shard.sha256:
        raise DataError(f"{path}: SHA-256 differs from the manifest (damaged?)")

  def to_json_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    del d["data_dir"]
    d["splits"] = {
        name: {"num_examples": s.num_examples, "shards": [dataclasses.asdict(x) for x in s.shards]}
        for name, s in self.splits.items()
    }
    # Where each referenced table lives, for readers that do not import us.
    d["files"] = {
        "items": ITEMS_FILE,
        "users": USERS_FILE,
        "categories": CATEGORIES_FILE,
        "user_histories": USER_HISTORIES_FILE,
        "item_frequencies": {"file": ITEMS_FILE, "column": ITEM_FREQUENCY_COLUMN},
    }
    d["features"] = {
        name: {"dtype": "int64", "shape": list(shape)}
        for name, shape in self.feature_shapes.items()
    }
    return d

  @classmethod
  def from_json_dict(cls, d: Mapping[str, Any], data_dir: Path | None = None) -> "Manifest":
    where = data_dir / MANIFEST_FILE if data_dir else MANIFEST_FILE
    version = d.get("schema_version")
    if version != SCHEMA_VERSION:
      raise DataError(f"{where}: schema_version {version!r}, this code reads {SCHEMA_VERSION} "
                      "(re-run preprocess)")
    try:
      splits = {
          name: SplitInfo(int(s["num_examples"]), tuple(ShardInfo(**x) for x in s["shards"]))
          for name, s in d["splits"].items()
      }
      manifest = cls(
          source=dict(d["source"]),
          flags=dict(d["flags"]),
          max_seq_len=int(d["max_seq_len"]),
          samples=str(d["samples"]),
          holdout=str(d["holdout"]),
          compression=str(d["compression"]),
          counts={k: int(v) for k, v in d["counts"].items()},
          vocab_sizes={k: int(v) for k, v in d["vocab_sizes"].items()},
          splits=splits,
          schema_version=int(version),
          created_at=str(d.get("created_at", "")),
          data_dir=data_dir,
      )
    except (KeyError, TypeError, ValueError) as e:
      raise DataError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from e
    if manifest.holdout not in HOLDOUT_SPLITS or manifest.samples not in SAMPLES or \
        manifest.compression not in COMPRESSIONS:
      raise DataError(f"{where}: unknown holdout/samples/compression "
                      f"{manifest.holdout!r}/{manifest.samples!r}/{manifest.compression!r}")
    return manifest


def load(data_dir: Path | str) -> Manifest:
  """Reads and validates `data_dir/manifest.json` and the files it names."""
  data_dir = Path(data_dir).absolute()
  path = data_dir / MANIFEST_FILE
  if not path.is_file():
    raise DataError(f"{data_dir}: no {MANIFEST_FILE} here (not a preprocess output directory?)")
  try:
    d = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise DataError(f"{path}: not valid JSON ({e})") from e
  manifest = Manifest.from_json_dict(d, data_dir)
  for relative in (ITEMS_FILE, USERS_FILE, CATEGORIES_FILE, USER_HISTORIES_FILE):
    if not (data_dir / relative).is_file():
      raise DataError(f"{data_dir / relative}: file named by the manifest is missing")
  return manifest


def write(manifest: Manifest, data_dir: Path | str) -> None:
  d = manifest.to_json_dict()
  if not d["created_at"]:
    d["created_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  write_json_atomic(Path(data_dir) / MANIFEST_FILE, d)
