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

`preprocess --mode=ranking` writes a second kind of directory, ranking data
(`RankingManifest`, read with `load_ranking`): one example per (user,
retrieval candidate) with the features of `ranking_feature_specs`, a train
and an eval split, copies of the item and user vocabularies, and the means
and variances of the dense features over the training split (the ranker
standardises inside its graph). Its manifest.json has `"kind": "ranking"`.
"""

import dataclasses
import datetime
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from contracts.errors import DataError
from contracts.fileio import sha256_file, write_json_atomic

SCHEMA_VERSION = 1
RANKING_SCHEMA_VERSION = 1
KIND_SEQUENCES = "sequences"
KIND_RANKING = "ranking"
MANIFEST_FILE = "manifest.json"
ITEMS_FILE = "vocab/items.parquet"
USERS_FILE = "vocab/users.parquet"
CATEGORIES_FILE = "vocab/categories.parquet"
USER_HISTORIES_FILE = "user_histories.parquet"
# Ranking data: the retrieval model's unit item vectors, row i = item index i.
RANKING_ITEM_VECTORS_FILE = "item_embeddings.npy"

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
# Ranking examples (also FEATURE_USER and FEATURE_HISTORY).
FEATURE_CANDIDATE = "candidate"
FEATURE_CANDIDATE_CATEGORY = "candidate_category"
FEATURE_LABEL = "label"
FEATURE_DENSE = "dense"
RANK_TRAIN = "train"
RANK_EVAL = "eval"
# The notebook's dense ranking features plus transitions_from_last, in the
# order of the `dense` vector (preprocess/ranking.py says how each is computed).
DENSE_FEATURES = ("recall_score", "recall_rank", "user_click_count", "user_unique_items",
                  "item_click_count", "words_count", "item_age_hours", "time_gap_hours",
                  "emb_sim_last", "is_same_category", "transitions_from_last")
# Counts and ranks are heavy-tailed: the ranker standardises log1p of them.
LOG1P_FEATURES = ("recall_rank", "user_click_count", "user_unique_items", "item_click_count",
                  "words_count", "transitions_from_last")


def dense_model_input(dense, log1p):
  """What the ranker standardises: log1p(max(x, 0)) where `log1p`, else x (numpy)."""
  dense = np.asarray(dense, np.float64)
  return np.where(np.asarray(log1p, bool), np.log1p(np.maximum(dense, 0.0)), dense)

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


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
  shape: tuple[int, ...]
  dtype: str  # "int64" or "float32"


def example_feature_shapes(max_seq_len: int) -> dict[str, tuple[int, ...]]:
  """Feature name -> fixed shape of every tf.train.Example (all int64)."""
  return {
      FEATURE_USER: (),
      FEATURE_HISTORY: (max_seq_len,),
      FEATURE_LENGTH: (),
      FEATURE_TARGET: (),
      FEATURE_TARGET_CATEGORY: (),
  }


def ranking_feature_specs(max_hist_len: int, num_dense: int) -> dict[str, FeatureSpec]:
  """Feature name -> spec of every ranking tf.train.Example.

  history: the user's last `max_hist_len` clicks before the held-out one,
  left-padded; label: 1 when the candidate is the held-out click; dense:
  DENSE_FEATURES as raw (unstandardised) float32.
  """
  return {
      FEATURE_USER: FeatureSpec((), "int64"),
      FEATURE_HISTORY: FeatureSpec((max_hist_len,), "int64"),
      FEATURE_CANDIDATE: FeatureSpec((), "int64"),
      FEATURE_CANDIDATE_CATEGORY: FeatureSpec((), "int64"),
      FEATURE_LABEL: FeatureSpec((), "int64"),
      FEATURE_DENSE: FeatureSpec((num_dense,), "float32"),
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


class _ShardedData:
  """What both kinds of data directory share: files, splits and shards."""
  data_dir: Path | None
  splits: Mapping[str, SplitInfo]
  compression: str
  holdout: str

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


def _splits_to_json(splits: Mapping[str, SplitInfo]) -> dict[str, Any]:
  return {name: {"num_examples": s.num_examples,
                 "shards": [dataclasses.asdict(x) for x in s.shards]}
          for name, s in splits.items()}


def _splits_from_json(d: Mapping[str, Any]) -> dict[str, SplitInfo]:
  return {name: SplitInfo(int(s["num_examples"]), tuple(ShardInfo(**x) for x in s["shards"]))
          for name, s in d.items()}


@dataclasses.dataclass(frozen=True)
class Manifest(_ShardedData):
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
  def feature_specs(self) -> dict[str, FeatureSpec]:
    return {name: FeatureSpec(shape, "int64") for name, shape in self.feature_shapes.items()}

  def to_json_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    del d["data_dir"]
    d["splits"] = _splits_to_json(self.splits)
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
      splits = _splits_from_json(d["splits"])
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
  d = _read_json(data_dir)
  if d.get("kind", KIND_SEQUENCES) != KIND_SEQUENCES:
    raise DataError(f"{path}: is {d.get('kind')!r} data (preprocess --mode=ranking), not "
                    "sequence examples; train it with --model=dien")
  manifest = Manifest.from_json_dict(d, data_dir)
  _check_files(data_dir, (ITEMS_FILE, USERS_FILE, CATEGORIES_FILE, USER_HISTORIES_FILE))
  return manifest


def _check_files(data_dir: Path, relatives: tuple[str, ...]) -> None:
  for relative in relatives:
    if not (data_dir / relative).is_file():
      raise DataError(f"{data_dir / relative}: file named by the manifest is missing")


def write(manifest: "Manifest | RankingManifest", data_dir: Path | str) -> None:
  """Writes either kind of manifest (stamping created_at) atomically."""
  d = manifest.to_json_dict()
  if not d["created_at"]:
    d["created_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  write_json_atomic(Path(data_dir) / MANIFEST_FILE, d)


@dataclasses.dataclass(frozen=True)
class RankingManifest(_ShardedData):
  """A ranking data directory (preprocess --mode=ranking); see the module docstring.

  Files: manifest.json, vocab/items.parquet and vocab/users.parquet (copies
  of the source data's, so raw ids and the data fingerprint travel with the
  examples), item_embeddings.npy (the retrieval model's unit item vectors),
  train/ and eval/ shards.
  """
  source: Mapping[str, Any]  # data_dir, candidates per split, item embeddings
  flags: Mapping[str, Any]
  max_hist_len: int
  holdout: str  # of the source data
  eval_split: str  # which held-out click the eval examples' labels are (valid | test)
  compression: str
  dense_features: tuple[str, ...]
  # Over the training split, of `dense_model_input` (log1p where dense_log1p).
  dense_mean: tuple[float, ...]
  dense_var: tuple[float, ...]
  dense_log1p: tuple[bool, ...]
  counts: Mapping[str, int]
  vocab_sizes: Mapping[str, int]  # items/users/categories, padding row included
  splits: Mapping[str, SplitInfo]
  kind: str = KIND_RANKING
  schema_version: int = RANKING_SCHEMA_VERSION
  created_at: str = ""
  data_dir: Path | None = dataclasses.field(default=None, compare=False)

  @property
  def feature_specs(self) -> dict[str, FeatureSpec]:
    return ranking_feature_specs(self.max_hist_len, len(self.dense_features))

  def to_json_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    del d["data_dir"]
    d["splits"] = _splits_to_json(self.splits)
    for name in ("dense_features", "dense_mean", "dense_var", "dense_log1p"):
      d[name] = list(getattr(self, name))
    d["files"] = {"items": ITEMS_FILE, "users": USERS_FILE,
                  "item_embeddings": RANKING_ITEM_VECTORS_FILE}
    d["features"] = {name: {"dtype": spec.dtype, "shape": list(spec.shape)}
                     for name, spec in self.feature_specs.items()}
    return d

  @classmethod
  def from_json_dict(cls, d: Mapping[str, Any], data_dir: Path | None = None
                     ) -> "RankingManifest":
    where = data_dir / MANIFEST_FILE if data_dir else MANIFEST_FILE
    if d.get("schema_version") != RANKING_SCHEMA_VERSION:
      raise DataError(f"{where}: ranking schema_version {d.get('schema_version')!r}, this code "
                      f"reads {RANKING_SCHEMA_VERSION} (re-run preprocess --mode=ranking)")
    try:
      manifest = cls(
          source=dict(d["source"]), flags=dict(d["flags"]),
          max_hist_len=int(d["max_hist_len"]), holdout=str(d["holdout"]),
          eval_split=str(d["eval_split"]), compression=str(d["compression"]),
          dense_features=tuple(d["dense_features"]),
          dense_mean=tuple(float(x) for x in d["dense_mean"]),
          dense_var=tuple(float(x) for x in d["dense_var"]),
          dense_log1p=tuple(bool(x) for x in d["dense_log1p"]),
          counts={k: int(v) for k, v in d["counts"].items()},
          vocab_sizes={k: int(v) for k, v in d["vocab_sizes"].items()},
          splits=_splits_from_json(d["splits"]), created_at=str(d.get("created_at", "")),
          data_dir=data_dir)
    except (KeyError, TypeError, ValueError) as e:
      raise DataError(f"{where}: malformed ranking manifest ({type(e).__name__}: {e})") from e
    if len({len(manifest.dense_features), len(manifest.dense_mean), len(manifest.dense_var),
            len(manifest.dense_log1p)}) != 1:
      raise DataError(f"{where}: dense_features, dense_mean, dense_var and dense_log1p differ "
                      "in length")
    return manifest


def read_kind(data_dir: Path | str) -> str:
  """KIND_SEQUENCES or KIND_RANKING, from the manifest (DataError if there is none)."""
  return str(_read_json(Path(data_dir).absolute()).get("kind", KIND_SEQUENCES))


def _read_json(data_dir: Path) -> dict[str, Any]:
  path = data_dir / MANIFEST_FILE
  if not path.is_file():
    raise DataError(f"{data_dir}: no {MANIFEST_FILE} here (not a preprocess output directory?)")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise DataError(f"{path}: not valid JSON ({e})") from e


def load_ranking(data_dir: Path | str) -> RankingManifest:
  """Reads and validates a ranking data directory's manifest and vocabularies."""
  data_dir = Path(data_dir).absolute()
  d = _read_json(data_dir)
  if d.get("kind", KIND_SEQUENCES) != KIND_RANKING:
    raise DataError(f"{data_dir / MANIFEST_FILE}: sequence examples, not ranking data (make "
                    "ranking data with preprocess --mode=ranking)")
  manifest = RankingManifest.from_json_dict(d, data_dir)
  _check_files(data_dir, (ITEMS_FILE, USERS_FILE, RANKING_ITEM_VECTORS_FILE))
  return manifest
