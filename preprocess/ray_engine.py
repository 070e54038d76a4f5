"""`preprocess --engine=ray`: the preprocess job as Ray Data operations.

The same job as preprocess/pipeline.py (its docstring lists the stages), cut
so that no process holds the log: the clicks live in Ray's object store,
which spills to disk when they do not fit.

1. read: one task per click file streams it in blocks; each click gets a
   source key that orders it as the file does, and a partition, a hash of
   its user id.
2. group by partition: a group holds whole users. What is per user in the
   cleaning (the out-of-order count, exact duplicates, the order by time and
   source row) runs vectorised on the group, and each user leaves as one
   row holding their clicks as lists. This is the dataset every later
   stage reads (materialised: in the object store, or spilled).
3. The global decisions go through the driver as aggregates over items and
   users, never clicks: the id types (integers unless a value is not a
   canonical integer, as the default engine decides), --min_item_clicks,
   the item vocabulary (clicks and training clicks per item), the user
   vocabulary (users by raw id) and the counts of the manifest.
4. examples: each example gets a shard from a seeded hash of (user,
   position); a group by shard writes each TFRecord file, its examples in
   the order of a second seeded hash. Shards are thus a seeded random
   partition (equal in expectation, not exactly), and the examples are the
   default engine's as a multiset.
5. user_histories.parquet: the users sorted by index stream through the
   driver a row group at a time.

The driver holds O(users + items) (the vocabularies); a task holds one
partition or one shard (--ray_partitions, --num_shards bound them). Output
goes to the same temporary sibling of --output_dir as the default engine's,
renamed into place when complete. Paths must be visible to every node under
the same name (a shared file system).
"""

import dataclasses
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from absl import logging

from contracts import cli
from contracts import manifest as mf
from contracts import ray_cluster
from contracts import sequences as sq
from contracts.errors import ConfigError, DataError
from contracts.fileio import atomic_directory, check_replaceable, locked_output, output_errors
from preprocess import pipeline, readers
from preprocess.tfrecord_writer import TFRecordFileWriter

# The sources whose click files are read in parallel blocks.
SOURCES = ("csv", "news")
CLICK_FILE_SUFFIXES = (".csv", ".tsv", ".txt", ".gz", ".parquet", ".pq")
CSV_BLOCK_BYTES = 16 << 20
PARQUET_BLOCK_ROWS = 1 << 20
# --ray_partitions=0 aims at this many input bytes per partition.
PARTITION_BYTES = 32 << 20
# Users per batch where each click becomes an example (max_seq_len ids): a
# block's worth of users would be a block's clicks times the history length.
USERS_PER_BATCH = 1024
_ROW_BITS = 40  # source key = file index << 40 | row in the file
_SPLITS = (mf.TRAIN, mf.VALID, mf.TEST)
_SHARD_BITS = 24  # shard key = split code << 24 | shard
_SHARD_SALT = "example shard"
_ORDER_SALT = "example order"


def import_ray():
  """Ray with Ray Data, or a ConfigError naming the extra that installs them."""
  ray, _ = cli.import_extra("--engine=ray", "Ray", cli.RAY_EXTRA, "ray", "ray.data")
  return ray


@dataclasses.dataclass(frozen=True)
class ClickFiles:
  """Where the clicks are and which columns hold them."""
  paths: tuple[str, ...]
  user_col: str
  item_col: str
  time_col: str  # "": row order is the clock
  time_unit: str
  time_format: str = ""
  delimiter: str = ","
  column_names: tuple[str, ...] = ()
  articles: str = ""  # news: the articles table (read by the driver)


def click_files(config: pipeline.PreprocessConfig) -> ClickFiles:
  """The input of `config` as files to read in parallel; a ConfigError for
  what this engine does not read."""
  if config.source not in SOURCES:
    raise ConfigError(f"--engine=ray reads --source={' or '.join(SOURCES)}, not "
                      f"--source={config.source}; use the default engine for it")
  path = Path(config.input)
  if config.source == "news":
    if not path.is_dir():
      raise DataError(f"{path}: --source=news needs a directory holding "
                      f"{readers.NEWS_CLICKS} and {readers.NEWS_ARTICLES}")
    clicks = readers._require_file(path / readers.NEWS_CLICKS, "click log")
    articles = readers._require_file(path / readers.NEWS_ARTICLES, "articles file")
    user, item, ts = readers.NEWS_CLICK_COLUMNS
    return ClickFiles((str(clicks),), user, item, ts, "ms", articles=str(articles))
  options = config.csv
  if options.category_col:
    raise ConfigError("--category_col: --engine=ray does not read categories from the log; "
                      "use the default engine")
  if path.is_dir():
    paths = tuple(str(p) for p in sorted(path.iterdir())
                  if p.is_file() and p.name.endswith(CLICK_FILE_SUFFIXES))
    if not paths:
      raise DataError(f"{path}: no click files ({', '.join(CLICK_FILE_SUFFIXES)}) in it")
  elif path.is_file():
    paths = (str(path),)
  else:
    raise DataError(f"{path}: file not found")
  if not options.time_col and len(paths) > 1:
    raise ConfigError(f"--input={path}: row order is the clock without --time_col, and "
                      f"{len(paths)} files have no order between them; give --time_col")
  return ClickFiles(paths, options.user_col, options.item_col, options.time_col,
                    options.time_unit if options.time_col else "order", options.time_format,
                    options.delimiter, options.column_names)


# ----------------------------------------------------------------------------
# 1. read


def _is_parquet(path: str) -> bool:
  return path.endswith((".parquet", ".pq"))


def _file_blocks(path: str, files: ClickFiles):
  """Yields (table of the click columns, header lines) per block of one file.
  Id columns of a CSV are text: `030` is not 30 (the default engine's rule)."""
  columns = [c for c in (files.user_col, files.item_col, files.time_col) if c]
  if _is_parquet(path):
    try:
      parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowInvalid) as e:
      raise DataError(f"{path}: cannot read Parquet ({e})") from e
    readers.check_columns(path, parquet.schema_arrow.names, columns)
    for batch in parquet.iter_batches(PARQUET_BLOCK_ROWS, columns=columns):
      yield pa.Table.from_batches([batch]), 0
    return
  read_options = pacsv.ReadOptions(column_names=list(files.column_names) or None,
                                   block_size=CSV_BLOCK_BYTES)
  parse_options = pacsv.ParseOptions(delimiter=files.delimiter)
  convert = pacsv.ConvertOptions(include_columns=columns, column_types={
      files.user_col: pa.string(), files.item_col: pa.string()})
  try:
    with pacsv.open_csv(path, read_options=read_options, parse_options=parse_options) as reader:
      readers.check_columns(path, reader.schema.names, columns)
    with pacsv.open_csv(path, read_options=read_options, parse_options=parse_options,
                        convert_options=convert) as reader:
      for batch in reader:
        yield pa.Table.from_batches([batch]), 0 if files.column_names else 1
  except pa.ArrowInvalid as e:
    if "Empty CSV file" in str(e):
      raise DataError(f"{path}: file is empty") from e
    raise DataError(f"{path}: cannot parse ({e})") from e


def _ids(column: pa.ChunkedArray, path: str, name: str, lines: int, parquet: bool) -> pa.Array:
  """An id column of one block: int64 (integer columns) or strings."""
  readers._refuse_nulls(column, Path(path), name, lines, parquet)
  if pa.types.is_integer(column.type):  # uint64 beyond int64 refused as the default engine does
    (ids,), _ = readers._encode_ids([column], Path(path), name, lines, parquet)
    return pa.array(ids)
  if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
    raise DataError(f"{path}: column {name!r}: ids must be integers or strings, not "
                    f"{column.type}")
  column = column.combine_chunks().cast(pa.string())
  empty = pc.equal(pc.utf8_length(column), 0).to_numpy(zero_copy_only=False)
  if empty.any():
    row = int(np.flatnonzero(empty)[0])
    raise DataError(f"{path}: column {name!r} {readers._describe_row(row, lines, parquet)}: "
                    "empty id")
  return column


def partition_of(user: pa.Array, num_partitions: int) -> np.ndarray:
  """A user's partition: a hash of the raw id, so all of a user's clicks meet."""
  hashed = pd.util.hash_array(user.to_numpy(zero_copy_only=False))
  return (hashed % np.uint64(num_partitions)).astype(np.int32)


def read_file(batch: dict, files: ClickFiles, num_partitions: int):
  """A Ray Data generator: the clicks of one file, a block at a time."""
  file_index, path = int(batch["file"][0]), str(batch["path"][0])
  parquet, row = _is_parquet(path), 0
  for table, header in _file_blocks(path, files):
    lines = header + row  # rows before this block, as the default engine counts lines
    n = table.num_rows
    user = _ids(table.column(files.user_col), path, files.user_col, lines, parquet)
    item = _ids(table.column(files.item_col), path, files.item_col, lines, parquet)
    key = (np.int64(file_index) << _ROW_BITS) + np.arange(row, row + n, dtype=np.int64)
    if files.time_col:
      ts = readers._time_column_to_int64(table.column(files.time_col), Path(path),
                                         files.time_col, lines, files.time_unit, parquet,
                                         files.time_format)
    else:  # one file (click_files): the row is the clock
      ts = key
    yield pa.table({"user": user, "item": item, "ts": pa.array(ts, pa.int64()),
                    "key": pa.array(key), "part": pa.array(partition_of(user, num_partitions))})
    row += n


# ----------------------------------------------------------------------------
# 2. per-user cleaning


def _lists(values, offsets: np.ndarray) -> pa.Array:
  return pa.LargeListArray.from_arrays(pa.array(offsets.astype(np.int64)), pa.array(values))


def _flat(table: pa.Table, name: str) -> pa.Array:
  return table.column(name).combine_chunks().flatten()


def _offsets(table: pa.Table) -> np.ndarray:
  offsets = table.column("item").combine_chunks().offsets.to_numpy().astype(np.int64)
  return offsets - offsets[0]  # a slice's offsets start where it starts


def _first_click_per_epoch_unit(ts: np.ndarray, key: np.ndarray, num_users: int
                                ) -> tuple[pa.Array, pa.Array]:
  """(source key, time) of the first click in source order whose time is a
  date in each of readers.EPOCH_UNITS (key -1: none), as lists on the first
  user row of a partition (the others' lists are empty): the driver tells a
  column mixing units from these, which no block or partition can alone."""
  units = len(readers.EPOCH_UNITS)
  keys, times = np.full(units, -1, np.int64), np.zeros(units, np.int64)
  unit = readers.epoch_unit_of(ts)
  for k in range(units):
    inside = np.flatnonzero(unit == k)
    if len(inside):
      first = inside[np.argmin(key[inside])]
      keys[k], times[k] = key[first], ts[first]
  offsets = pa.array(np.concatenate([[0], np.full(num_users, units)]).astype(np.int32))
  return pa.ListArray.from_arrays(offsets, keys), pa.ListArray.from_arrays(offsets, times)


def clean_partition(table: pa.Table, epoch_units: bool = False) -> pa.Table:
  """Clicks of whole users -> one row per user: the clicks sorted by (time,
  source row) with exact duplicates dropped, and what that counted (with
  `epoch_units`, the first click of each epoch unit too)."""
  user = table.column("user").to_numpy(zero_copy_only=False)
  item = table.column("item").to_numpy(zero_copy_only=False)
  ts, key = table.column("ts").to_numpy(), table.column("key").to_numpy()
  codes, uniques = pd.factorize(user)  # any order: users only need telling apart here
  columns = {}
  if epoch_units:
    columns["unit_key"], columns["unit_time"] = _first_click_per_epoch_unit(ts, key,
                                                                            len(uniques))
  by_row = np.lexsort((key, codes))
  backwards = (np.diff(codes[by_row]) == 0) & (np.diff(ts[by_row]) < 0)
  out_of_order = np.bincount(codes[by_row][1:][backwards], minlength=len(uniques))
  order = np.lexsort((key, ts, codes))
  codes, item, ts, key = codes[order], item[order], ts[order], key[order]
  keep = pipeline._drop_exact_duplicates(codes, pd.factorize(item)[0], ts)
  duplicates = np.bincount(codes[~keep], minlength=len(uniques))
  codes, item, ts, key = codes[keep], item[keep], ts[keep], key[keep]
  offsets = np.concatenate([[0], np.cumsum(np.bincount(codes, minlength=len(uniques)))])
  return pa.table({
      "user": pa.array(uniques, table.schema.field("user").type),
      "item": _lists(pa.array(item, table.schema.field("item").type), offsets),
      "ts": _lists(ts, offsets),
      "out_of_order": pa.array(out_of_order.astype(np.int64)),
      "duplicates": pa.array(duplicates.astype(np.int64)),
      **columns,
  })


# ----------------------------------------------------------------------------
# 3. aggregates for the driver


def epoch_unit_clicks(table: pa.Table) -> pa.Table:
  """clean_partition's first clicks per epoch unit of a batch of users: rows
  (unit, key, ts)."""
  keys, times = _flat(table, "unit_key").to_numpy(), _flat(table, "unit_time").to_numpy()
  unit = np.tile(np.arange(len(readers.EPOCH_UNITS), dtype=np.int64),
                 len(keys) // len(readers.EPOCH_UNITS))
  found = keys >= 0
  return pa.table({"unit": unit[found], "key": keys[found], "ts": times[found]})


def _is_text(type_: pa.DataType) -> bool:
  return pa.types.is_string(type_) or pa.types.is_large_string(type_)


def all_canonical(values: pa.Array) -> bool:
  """Whether text ids are all canonical integers within int64 (then they are
  integer ids; 2^63 written out is a string id, as in the default engine)."""
  if not _is_text(values.type) or not len(values):
    return True
  if not pc.all(pc.match_substring_regex(values, readers._CANONICAL_INT)).as_py():
    return False
  try:
    pc.cast(values, pa.int64())
  except pa.ArrowInvalid:  # 19 digits beyond int64
    return False
  return True


def item_clicks(table: pa.Table) -> pa.Table:
  """Clicks per item of a batch of users (kept ones, and training clicks,
  once the table has `kept` and `train_end`)."""
  offsets = _offsets(table)
  lengths = np.diff(offsets)
  flat = _flat(table, "item")
  frame = pd.DataFrame({"item": flat.to_numpy(zero_copy_only=False),
                        "clicks": np.ones(len(flat), np.int64)})
  if "train_end" in table.column_names:
    within = np.arange(len(flat)) - np.repeat(offsets[:-1] - offsets[0], lengths)
    frame["train"] = (within < np.repeat(table.column("train_end").to_numpy(), lengths)
                      ).astype(np.int64)
    kept = np.repeat(table.column("kept").to_numpy(zero_copy_only=False), lengths)
    frame = frame[kept]
  counts = frame.groupby("item", sort=False).sum().reset_index()
  return pa.table({"item": pa.array(counts["item"].to_numpy(), flat.type),
                   **{c: pa.array(counts[c].to_numpy(np.int64)) for c in counts.columns[1:]}})


def user_sums(table: pa.Table) -> pa.Table:
  """One row of sums over a batch of cleaned users."""
  return pa.table({
      "clicks": [int(np.diff(_offsets(table)).sum())],
      "out_of_order": [int(pc.sum(table.column("out_of_order")).as_py() or 0)],
      "duplicates": [int(pc.sum(table.column("duplicates")).as_py() or 0)],
      "users_canonical": [all_canonical(table.column("user").combine_chunks())],
  })


# ----------------------------------------------------------------------------
# 3b. filters and the holdout


def _as_ids(values: pa.Array, is_int: bool) -> pa.Array:
  return pc.cast(values, pa.int64()) if is_int and _is_text(values.type) else values


def filter_users(table: pa.Table, kept_items: pa.Array | None, min_user_clicks: int,
                 user_is_int: bool, item_is_int: bool, holdout: str) -> pa.Table:
  """--min_item_clicks (`kept_items`, None: no filter), then --min_user_clicks
  (`kept`), then the holdout (`train_end`, in the user's clicks); ids become
  int64 when the driver found them all integers."""
  offsets = _offsets(table)
  items, ts = _flat(table, "item"), _flat(table, "ts")
  dropped = np.zeros(table.num_rows, np.int64)
  if kept_items is not None:
    keep = pc.is_in(items, value_set=kept_items).to_numpy(zero_copy_only=False)
    user_of = np.repeat(np.arange(table.num_rows), np.diff(offsets))
    dropped = np.bincount(user_of[~keep], minlength=table.num_rows)
    offsets = np.concatenate([[0], np.cumsum(np.diff(offsets) - dropped)])
    items, ts = items.filter(pa.array(keep)), ts.filter(pa.array(keep))
  lengths = np.diff(offsets)
  kept = lengths >= max(min_user_clicks, 1)
  seqs = sq.Sequences(np.zeros(len(items), np.int64), ts.to_numpy(), offsets)
  train_end = sq.split_holdout(seqs, holdout).train_end - offsets[:-1]
  return pa.table({
      "user": _as_ids(table.column("user").combine_chunks(), user_is_int),
      "item": _lists(_as_ids(items, item_is_int), offsets),
      "ts": _lists(ts, offsets),
      "kept": pa.array(kept),
      "train_end": pa.array(np.where(kept, train_end, 0).astype(np.int64)),
      "dropped_min_item": pa.array(dropped),
  })


def filtered_sums(table: pa.Table, min_user_clicks: int, samples: str, max_seq_len: int,
                  max_samples_per_user: int, protocol: str) -> pa.Table:
  """One row of the manifest's counts over a batch of filtered users."""
  lengths = np.diff(_offsets(table))
  kept = table.column("kept").to_numpy(zero_copy_only=False)
  dropped_user = ~kept & (lengths > 0)
  kept_table = table.filter(table.column("kept"))
  offsets = _offsets(kept_table)
  seqs = sq.Sequences(np.zeros(offsets[-1], np.int64), _flat(kept_table, "ts").to_numpy(),
                      offsets)
  holdout = sq.split_holdout(seqs, protocol)
  targets = sq.train_targets(seqs, holdout, samples, max_seq_len, max_samples_per_user)
  examples_per_user = np.bincount(seqs.user_of(targets), minlength=seqs.num_users + 1)[1:]
  row = {
      "rows_dropped_min_item_clicks": int(table.column("dropped_min_item").to_numpy().sum()),
      "users_dropped_min_user_clicks": int(dropped_user.sum()) if min_user_clicks else 0,
      "rows_dropped_min_user_clicks": int(lengths[dropped_user].sum()) if min_user_clicks else 0,
      "clicks": int(offsets[-1]),
      "train_clicks": int((holdout.train_end - seqs.starts).sum()),
      "users_without_holdout": int((holdout.targets[mf.VALID] < 0).sum()),
      "users_without_train_examples": int((examples_per_user == 0).sum()),
      f"examples_{mf.TRAIN}": len(targets),
  }
  for split in mf.HOLDOUT_SPLITS[protocol]:
    row[f"examples_{split}"] = int((holdout.targets[split] >= 0).sum())
  return pa.table({k: [v] for k, v in row.items()})


# ----------------------------------------------------------------------------
# 4. indices, examples, histories


@dataclasses.dataclass(frozen=True)
class Lookups:
  """Raw id -> index for users and items, decided by the driver."""
  user_ids: pa.Array  # kept users' raw ids (int64 or string), sorted: index - 1
  item_keys: pa.Array  # item raw ids (int64 or string) ...
  item_index: np.ndarray  # ... and the index of each (int32)
  item_category: np.ndarray  # int32 [items + 1]


def _resolved(value):
  """Lookups travel as one object in the object store; each task reads it there."""
  import ray
  return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def _position(values: pa.Array, sorted_values: pa.Array) -> np.ndarray:
  if _is_text(values.type):
    return pc.index_in(values, value_set=sorted_values).to_numpy(zero_copy_only=False)
  return np.searchsorted(sorted_values.to_numpy(), values.to_numpy())


def indexed(table: pa.Table, lookups: Lookups, protocol: str
            ) -> tuple[pa.Table, np.ndarray, sq.Sequences, sq.Holdout]:
  """The kept users of a filtered batch: (table, user indices, clicks as item
  indices, holdout). Users of a batch are in any order; Sequences does not care."""
  lookups = _resolved(lookups)
  table = table.filter(table.column("kept"))
  offsets = _offsets(table)
  users = (_position(table.column("user").combine_chunks(), lookups.user_ids) + 1
           ).astype(np.int32)
  items = lookups.item_index[_position(_flat(table, "item"), lookups.item_keys)]
  seqs = sq.Sequences(items.astype(np.int32), _flat(table, "ts").to_numpy(), offsets)
  return table, users, seqs, sq.split_holdout(seqs, protocol)


def _seeded_hash(values: np.ndarray, seed: int, salt: str) -> np.ndarray:
  """A uint64 hash of `values` that depends on --seed and on `salt`."""
  mixed = values.astype(np.uint64) ^ np.uint64((seed * 0x9E3779B97F4A7C15) % 2**64)
  return pd.util.hash_array(mixed, hash_key=salt.ljust(16)[:16])


def examples(table: pa.Table, lookups: Lookups, config: pipeline.PreprocessConfig,
             num_shards: dict[str, int]) -> pa.Table:
  """The examples of a batch of users, each with its shard and order keys."""
  lookups = _resolved(lookups)
  _, users, seqs, holdout = indexed(table, lookups, config.holdout)
  targets = {mf.TRAIN: sq.train_targets(seqs, holdout, config.samples, config.max_seq_len,
                                        config.max_samples_per_user)}
  for split in mf.HOLDOUT_SPLITS[config.holdout]:
    flat = holdout.targets[split]
    targets[split] = flat[flat >= 0]
  parts = []
  for split, flat in targets.items():
    features = pipeline.example_features(seqs, flat, lookups.item_category, config.max_seq_len)
    user = users[features[mf.FEATURE_USER] - 1]
    # (user index, position in the user): the same for an example whatever the batch
    where = (user.astype(np.uint64) << np.uint64(32)) | \
        (flat - seqs.starts[features[mf.FEATURE_USER] - 1]).astype(np.uint64)
    shard = _seeded_hash(where, config.seed, _SHARD_SALT) % np.uint64(num_shards[split])
    history = features[mf.FEATURE_HISTORY]
    parts.append(pa.table({
        "shard_key": pa.array((_SPLITS.index(split) << _SHARD_BITS) + shard.astype(np.int64)),
        "order": pa.array(_seeded_hash(where, config.seed, _ORDER_SALT) if split == mf.TRAIN
                          else user.astype(np.uint64)),
        mf.FEATURE_USER: pa.array(user),
        mf.FEATURE_HISTORY: pa.FixedSizeListArray.from_arrays(
            pa.array(history.reshape(-1)), history.shape[1]),
        mf.FEATURE_LENGTH: pa.array(features[mf.FEATURE_LENGTH]),
        mf.FEATURE_TARGET: pa.array(features[mf.FEATURE_TARGET]),
        mf.FEATURE_TARGET_CATEGORY: pa.array(features[mf.FEATURE_TARGET_CATEGORY]),
    }))
  return pa.concat_tables(parts)


def write_shard(table: pa.Table, out_dir: str, compression: str,
                num_shards: dict[str, int]) -> pa.Table:
  """One shard's examples -> its TFRecord file, in `order`; returns its ShardInfo."""
  shard_key = int(table.column("shard_key")[0].as_py())
  split, shard = _SPLITS[shard_key >> _SHARD_BITS], shard_key & ((1 << _SHARD_BITS) - 1)
  table = table.take(pc.sort_indices(table, sort_keys=[("order", "ascending"),
                                                       (mf.FEATURE_USER, "ascending")]))
  relative = mf.shard_file_name(split, shard, num_shards[split], compression)
  info = _write_tfrecords(Path(out_dir), relative, compression, table)
  return pa.table({k: [v] for k, v in dataclasses.asdict(info).items()})


def _write_tfrecords(out_dir: Path, relative: str, compression: str,
                     table: pa.Table) -> mf.ShardInfo:
  rows = 1 << 14
  with TFRecordFileWriter(out_dir / relative, compression) as writer:
    for begin in range(0, table.num_rows, rows):
      chunk = table.slice(begin, rows)
      history = chunk.column(mf.FEATURE_HISTORY).combine_chunks()
      writer.write_examples({
          mf.FEATURE_USER: chunk.column(mf.FEATURE_USER).to_numpy(),
          mf.FEATURE_HISTORY: history.flatten().to_numpy().reshape(-1, history.type.list_size),
          mf.FEATURE_LENGTH: chunk.column(mf.FEATURE_LENGTH).to_numpy(),
          mf.FEATURE_TARGET: chunk.column(mf.FEATURE_TARGET).to_numpy(),
          mf.FEATURE_TARGET_CATEGORY: chunk.column(mf.FEATURE_TARGET_CATEGORY).to_numpy(),
      })
    sha = writer.close()
  return mf.ShardInfo(relative, table.num_rows, writer.bytes_written, sha)


def target_counts(table: pa.Table, lookups: Lookups, config: pipeline.PreprocessConfig
                  ) -> pa.Table:
  """How often each item is a training target (the loss's positions), per batch."""
  _, _, seqs, holdout = indexed(table, lookups, config.holdout)
  targets = sq.train_targets(seqs, holdout, config.samples, config.max_seq_len,
                             config.max_samples_per_user)
  predicted = sq.per_position_target_mask(seqs, targets, config.samples, config.max_seq_len)
  index, count = np.unique(seqs.items[predicted], return_counts=True)
  return pa.table({"index": pa.array(index.astype(np.int32)),
                   "count": pa.array(count.astype(np.int64))})


def histories(table: pa.Table, lookups: Lookups, protocol: str, user_id_type: pa.DataType
              ) -> pa.Table:
  """USER_HISTORIES_FILE rows of a batch of users (in any order)."""
  table, users, seqs, holdout = indexed(table, lookups, protocol)
  rows = pipeline.user_histories_table(seqs, holdout, table.column("user").combine_chunks()
                                       .cast(user_id_type), holdout.train_mask(seqs),
                                       large_lists=True)
  return rows.set_column(0, "user", pa.array(users))


def kept_users(table: pa.Table) -> pa.Table:
  table = table.filter(table.column("kept"))
  return pa.table({"user": table.column("user"),
                   "num_clicks": pa.array(np.diff(_offsets(table)))})


# ----------------------------------------------------------------------------
# the driver


def _unwrap(error: BaseException) -> BaseException | None:
  """The DataError or ConfigError a Ray task raised, without Ray's wrapping
  (a RayTaskError subclass whose `cause` is it; Ray Data appends its advice
  to the message)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException):
      error = cause
      continue
    for kind in (DataError, ConfigError):
      if isinstance(error, kind):
        return kind(str(error).strip().splitlines()[0])
    error = error.__cause__
  return None


def _refuse_mixed_epoch_units(users, files: ClickFiles) -> None:
  """The default engine's DataError for a time column holding two epoch
  units, naming the first click of the two smallest (in source order)."""
  found = pa.concat_tables(_arrow_tables(users.map_batches(
      epoch_unit_clicks, batch_format="pyarrow", batch_size=None)))
  if not found.num_rows:
    return
  first = found.group_by("unit").aggregate([("key", "min")]).sort_by("unit")
  if first.num_rows < 2:
    return
  examples = []
  for unit, key in zip(first.column("unit").to_pylist()[:2],
                       first.column("key_min").to_pylist()[:2]):
    path = files.paths[key >> _ROW_BITS]
    row = key & ((1 << _ROW_BITS) - 1)
    parquet = _is_parquet(path)
    header = 0 if parquet or files.column_names else 1
    ts = found.filter(pc.equal(found.column("key"), key)).column("ts")[0].as_py()
    examples.append((path, readers._describe_row(row, header, parquet), ts, unit))
  raise readers.mixed_epoch_units(files.time_col, *examples)


def _sum_rows(dataset) -> dict[str, int | bool]:
  """Sums (ints) and conjunctions (bools) of a dataset of one-row sums."""
  table = pa.concat_tables(_arrow_tables(dataset))
  out = {}
  for name in table.column_names:
    column = table.column(name)
    out[name] = bool(pc.all(column).as_py()) if pa.types.is_boolean(column.type) \
        else int(pc.sum(column).as_py() or 0)
  return out


def _arrow_tables(dataset) -> list[pa.Table]:
  import ray
  return ray.get(dataset.to_arrow_refs())


def _item_totals(dataset, partitions: int) -> dict[str, pa.Array]:
  """Per-item sums of a dataset of partial per-item counts, on the driver:
  "item" (the raw ids) and each count column."""
  columns = [c for c in dataset.columns() if c != "item"]
  summed = pa.concat_tables(_arrow_tables(
      dataset.groupby("item", num_partitions=partitions).sum(columns)))
  return {"item": summed.column("item").combine_chunks(),
          **{c: summed.column(f"sum({c})").to_numpy() for c in columns}}


@dataclasses.dataclass
class _Ids:
  """How the driver turns raw ids into the default engine's int64 id space:
  the integers themselves, or positions in the sorted strings."""
  sorted_strings: pa.Array | None = None  # None: integer ids

  @property
  def dictionary(self) -> np.ndarray | None:
    """RawLog.dictionaries' form: the sorted raw strings, or None."""
    if self.sorted_strings is None:
      return None
    return self.sorted_strings.to_numpy(zero_copy_only=False)

  def codes(self, values: pa.Array) -> np.ndarray:
    if self.sorted_strings is None:
      return _as_ids(values, True).to_numpy()
    return pc.index_in(values, value_set=self.sorted_strings).to_numpy()


def _string_ids(*columns: pa.Array) -> _Ids:
  joined = pc.unique(pa.concat_arrays([c.cast(pa.string()) for c in columns]))
  return _Ids(joined.take(pc.sort_indices(joined)))


def run(config: pipeline.PreprocessConfig, ray_address: str = "", num_partitions: int = 0,
        object_store_memory: int = 0) -> mf.Manifest:
  """Runs the preprocess job on Ray (a local one unless `ray_address`)."""
  config.validate()
  files = click_files(config)
  ray = import_ray()
  output_dir = Path(config.output_dir)
  replaceable = config.replaceable()
  check_replaceable(output_dir, **replaceable)
  if not ray.is_initialized() and object_store_memory and ray_address:
    raise ConfigError("--ray_object_store_bytes sizes a local Ray; a cluster at "
                      "--ray_address has its own")
  ray_cluster.connect(ray, ray_address, include_dashboard=False, log_to_driver=False,
                      object_store_memory=object_store_memory or None)
  ray_cluster.quiet_data_errors()
  if "RAY_DATA_DEFAULT_SHUFFLE_STRATEGY" not in os.environ:
    # Tasks, not the default shuffle's aggregator actors, which each group-by
    # starts anew (seconds apiece on a small cluster: 10x the tiny log's run).
    ray.data.DataContext.get_current().shuffle_strategy = "sort_shuffle_pull_based"
  with locked_output(output_dir, "preprocess"):
    try:
      return _run_locked(ray, config, files, output_dir, replaceable, num_partitions)
    except Exception as e:  # a task's DataError arrives wrapped by Ray
      if type(e) in (DataError, ConfigError):
        raise
      cause = _unwrap(e)
      if cause is None:
        raise
      raise cause from None


def _run_locked(ray, config, files: ClickFiles, output_dir: Path, replaceable: dict,
                num_partitions: int) -> mf.Manifest:
  started = time.perf_counter()
  input_bytes = sum(Path(p).stat().st_size for p in files.paths)
  partitions = num_partitions or max(1, -(-input_bytes // PARTITION_BYTES))
  logging.info("preprocess on Ray: %d file(s), %.1f MB, %d partitions of users",
               len(files.paths), input_bytes / 1e6, partitions)
  file_rows = ray.data.from_items([{"file": i, "path": p} for i, p in enumerate(files.paths)])
  clicks = file_rows.map_batches(read_file, batch_size=1, fn_kwargs={
      "files": files, "num_partitions": partitions})
  epoch_units = files.time_unit != "order"  # a clock, in one unit
  users = clicks.groupby("part", num_partitions=partitions).map_groups(
      clean_partition, batch_format="pyarrow", fn_kwargs={"epoch_units": epoch_units})
  users = users.materialize()
  if not users.count():  # header lines only; an empty dataset has no columns to aggregate
    raise DataError(f"{files.paths[0]}: the click log has no rows")
  if epoch_units:
    _refuse_mixed_epoch_units(users, files)
  sums = _sum_rows(users.map_batches(user_sums, batch_format="pyarrow", batch_size=None))
  items = _item_totals(users.map_batches(item_clicks, batch_format="pyarrow", batch_size=None),
                       partitions)
  logging.info("read and cleaned %d clicks of %d users in %.1fs", sums["clicks"],
               users.count(), time.perf_counter() - started)
  item_values = items["item"]

  # The id types, over every raw id (the default engine's rule).
  features, category_dictionary, article_ids = None, None, None
  if files.articles:
    features, article_ids, category_dictionary, articles_header = _read_articles(files.articles)
  item_is_int = all_canonical(item_values) and (article_ids is None or all_canonical(article_ids))
  user_is_int = sums.pop("users_canonical")
  item_ids = _Ids() if item_is_int else _string_ids(
      item_values, *([] if article_ids is None else [article_ids]))
  if features is not None:
    features.insert(0, "item_id", item_ids.codes(article_ids))
    features = readers._check_unique_items(features, Path(files.articles), articles_header,
                                           item_ids.dictionary)

  kept_items = None
  if config.min_item_clicks > 0:
    kept_items = item_values.filter(pa.array(items["clicks"] >= config.min_item_clicks))
  filtered = users.map_batches(filter_users, batch_format="pyarrow", batch_size=None, fn_kwargs={
      "kept_items": kept_items, "min_user_clicks": config.min_user_clicks,
      "user_is_int": user_is_int, "item_is_int": item_is_int, "holdout": config.holdout})
  filtered = filtered.materialize()
  del users
  counts = {"input_rows": sums["clicks"] + sums["duplicates"],
            "out_of_order_rows": sums["out_of_order"],
            "duplicate_rows_dropped": sums["duplicates"]}
  counts.update(_sum_rows(filtered.map_batches(
      filtered_sums, batch_format="pyarrow", batch_size=None, fn_kwargs={
          "min_user_clicks": config.min_user_clicks, "samples": config.samples,
          "max_seq_len": config.max_seq_len,
          "max_samples_per_user": config.max_samples_per_user, "protocol": config.holdout})))
  if not counts["clicks"]:
    raise pipeline.no_clicks_left(files.paths[0], config.min_item_clicks,
                                  config.min_user_clicks)
  examples_per_split = {s: counts.pop(f"examples_{s}") for s in
                        (mf.TRAIN, *mf.HOLDOUT_SPLITS[config.holdout])}
  for split, n in examples_per_split.items():
    if n == 0:
      raise pipeline.no_examples(config, split)

  # Vocabularies, in the default engine's int64 id space.
  user_rows = pa.concat_tables(_arrow_tables(filtered.map_batches(
      kept_users, batch_format="pyarrow", batch_size=None)))
  by_user = pc.sort_indices(user_rows, [("user", "ascending")])
  sorted_users = user_rows.column("user").take(by_user).combine_chunks()
  user_clicks = user_rows.column("num_clicks").take(by_user).to_numpy()
  user_dictionary = None if user_is_int else sorted_users.to_numpy(zero_copy_only=False)
  log = readers.RawLog(
      np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), files.time_unit,
      list(files.paths) + ([files.articles] if files.articles else []), files.paths[0],
      items=features,
      dictionaries={"user": user_dictionary, "item": item_ids.dictionary,
                    "category": category_dictionary})
  clicked = _item_totals(filtered.map_batches(item_clicks, batch_format="pyarrow",
                                               batch_size=None), partitions)
  codes = item_ids.codes(clicked["item"])
  order = np.argsort(codes)
  kept_codes = None if kept_items is None else np.sort(item_ids.codes(kept_items))
  vocab = pipeline.item_vocabulary(log, kept_codes, codes[order],
                                   train_clicks=clicked["train"][order],
                                   all_clicks=clicked["clicks"][order])
  item_keys = pa.array(vocab.sorted_ids) if item_is_int else \
      item_ids.sorted_strings.take(pa.array(vocab.sorted_ids))
  lookups = ray.put(Lookups(sorted_users, item_keys, (vocab.rank + 1).astype(np.int32),
                            vocab.item_category))
  logging.info("vocabularies: %d users, %d items (%.1fs)", len(sorted_users), vocab.size - 1,
               time.perf_counter() - started)

  with output_errors(output_dir), atomic_directory(output_dir, **replaceable) as tmp:
    num_shards = {s: min(config.num_shards, n) for s, n in examples_per_split.items()}
    for split in num_shards:
      (tmp / split).mkdir()
    written = examples_dataset(filtered, lookups, config, num_shards).groupby(
        "shard_key", num_partitions=min(sum(num_shards.values()), partitions)).map_groups(
            write_shard, batch_format="pyarrow", fn_kwargs={
                "out_dir": str(tmp), "compression": config.compression,
                "num_shards": num_shards})
    shard_rows = pa.concat_tables(_arrow_tables(written)).to_pylist()
    splits = _split_infos(tmp, shard_rows, num_shards, config.compression)
    logging.info("wrote %d examples in %d shards (%.1fs)",
                 sum(s.num_examples for s in splits.values()), len(shard_rows),
                 time.perf_counter() - started)

    target = _target_counts(filtered, lookups, config, vocab.size, partitions)
    (tmp / "vocab").mkdir()
    pq.write_table(vocab.items.append_column("target_count", pa.array(target)),
                   tmp / mf.ITEMS_FILE)
    users_table = pipeline.users_table(
        sorted_users.to_numpy() if user_is_int else np.arange(len(sorted_users)), user_clicks,
        user_dictionary)
    pq.write_table(users_table, tmp / mf.USERS_FILE)
    pq.write_table(vocab.categories, tmp / mf.CATEGORIES_FILE)
    _write_histories(filtered, lookups, config.holdout, users_table.schema.field("user_id").type,
                     counts["train_clicks"], tmp / mf.USER_HISTORIES_FILE)
    manifest = pipeline.build_manifest(config, log, counts, vocab, splits, len(sorted_users))
    mf.write(manifest, tmp)
  logging.info("wrote %s in %.1fs: %s", output_dir, time.perf_counter() - started,
               ", ".join(f"{s} {i.num_examples} examples" for s, i in splits.items()))
  return mf.load(output_dir)


def examples_dataset(filtered, lookups, config, num_shards):
  return filtered.map_batches(
      examples, batch_format="pyarrow", batch_size=USERS_PER_BATCH,
      fn_kwargs={"lookups": lookups, "config": config, "num_shards": num_shards})


def _split_infos(out_dir: Path, shard_rows: list[dict], num_shards: dict[str, int],
                 compression: str) -> dict[str, mf.SplitInfo]:
  """SplitInfos from the written shards; a shard the hash left empty is an empty file."""
  by_name = {row["path"]: row for row in shard_rows}
  splits = {}
  for split, n in num_shards.items():
    infos = []
    for shard in range(n):
      relative = mf.shard_file_name(split, shard, n, compression)
      row = by_name.get(relative)
      if row is None:  # no rows: _write_tfrecords writes an empty file
        infos.append(_write_tfrecords(out_dir, relative, compression, pa.table({})))
      else:
        infos.append(mf.ShardInfo(relative, row["num_examples"], row["bytes"], row["sha256"]))
    splits[split] = mf.SplitInfo(sum(i.num_examples for i in infos), tuple(infos))
  return splits


def _target_counts(filtered, lookups, config, vocab_size: int, partitions: int) -> np.ndarray:
  """How often each item index is a training target (ITEMS_FILE's target_count)."""
  summed = filtered.map_batches(target_counts, batch_format="pyarrow", batch_size=None,
                                fn_kwargs={"lookups": lookups, "config": config}
                                ).groupby("index", num_partitions=partitions).sum("count")
  table = pa.concat_tables(_arrow_tables(summed))
  out = np.zeros(vocab_size, np.int64)
  out[table.column("index").to_numpy()] = table.column("sum(count)").to_numpy()
  out[0] = 0
  return out


def _write_histories(filtered, lookups, protocol: str, user_id_type: pa.DataType,
                     train_clicks: int, path: Path) -> None:
  """The users sorted by index through one Parquet writer, in the default
  engine's row groups and list types."""
  ordered = filtered.map_batches(
      histories, batch_format="pyarrow", batch_size=USERS_PER_BATCH,
      fn_kwargs={"lookups": lookups, "protocol": protocol, "user_id_type": user_id_type}
  ).sort("user")
  schema, writer, pending = None, None, []
  size = mf.USER_HISTORIES_ROW_GROUP

  def flush(rows: pa.Table) -> None:
    writer.write_table(rows.cast(schema), row_group_size=size)

  try:
    for batch in ordered.iter_batches(batch_format="pyarrow", batch_size=size):
      if writer is None:
        schema = _histories_schema(batch.schema, large=train_clicks >= 2**31)
        writer = pq.ParquetWriter(path, schema)
      pending.append(batch)
      rows = sum(t.num_rows for t in pending)
      if rows >= size:
        table = pa.concat_tables(pending)
        full = (rows // size) * size
        flush(table.slice(0, full))
        pending = [table.slice(full)]
    if pending and sum(t.num_rows for t in pending):
      flush(pa.concat_tables(pending))
  finally:
    if writer is not None:
      writer.close()


def _histories_schema(schema: pa.Schema, large: bool) -> pa.Schema:
  fields = []
  for field in schema:
    if pa.types.is_large_list(field.type) and not large:
      field = field.with_type(pa.list_(field.type.value_type))
    fields.append(field)
  return pa.schema(fields)


def _read_articles(path: str):
  """news: the articles table, read by the driver (items, not clicks):
  (features without item_id, raw article ids, category dictionary, header lines)."""
  table, header = readers._read_csv(Path(path), readers.NEWS_ARTICLE_COLUMNS,
                                    text_columns=("article_id", "category_id"))
  readers._refuse_nulls(table.column("article_id"), Path(path), "article_id", header, False)
  (category,), dictionary = readers._encode_ids([table.column("category_id")], Path(path),
                                                "category_id", header, False)
  features = pd.DataFrame({"category_id": category})
  for c in ("created_at_ts", "words_count"):
    features[c] = readers._column_to_int64(table.column(c), Path(path), c, header)
  return features, table.column("article_id").combine_chunks(), dictionary, header
