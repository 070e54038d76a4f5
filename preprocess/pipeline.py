"""The preprocess job: RawLog -> cleaned clicks -> vocabularies -> examples.

Stages (each vectorised over the whole log; memory is O(clicks) for the log
arrays plus one chunk of examples at a time while writing):

1. clean: drop exact duplicate rows (user, item, time), apply
   --min_item_clicks then --min_user_clicks (one pass each), count clicks
   whose time goes backwards in file order, and sort by (user, time, source
   row) so equal times keep file order.
2. vocabularies: users by raw id; items by training clicks (most clicked =
   index 1, ties by raw id), so popularity order is index order; categories
   by raw id. Index 0 is padding/unknown everywhere.
3. holdout (`sequences.split_holdout`) and training targets
   (`sequences.train_targets`), shuffled globally with --seed and cut into
   equal shards, so every shard is a fair sample of the whole log.
4. everything is written into a temporary sibling of --output_dir, which is
   renamed into place only when complete.
"""

import dataclasses
import multiprocessing
import multiprocessing.connection
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from absl import logging

from contracts import manifest as mf
from contracts import sequences as sq
from contracts.errors import DataError
from contracts.fileio import atomic_directory, check_replaceable, locked_output, output_errors
from preprocess import readers
from preprocess.tfrecord_writer import TFRecordFileWriter


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
  """Everything that determines a preprocess output (saved in the manifest)."""
  source: str
  input: str
  output_dir: str
  overwrite: bool = False
  max_seq_len: int = 50
  samples: str = "positions"
  max_samples_per_user: int = 0  # 0: no cap
  holdout: str = "last"
  min_user_clicks: int = 0
  min_item_clicks: int = 0
  num_shards: int = 8
  compression: str = "GZIP"
  seed: int = 42
  movies: str = ""  # movielens: movies.dat (default: next to the ratings)
  csv: readers.CsvOptions | None = None
  num_workers: int = 0  # processes writing shards; 0: one per CPU core
  examples_per_chunk: int = 16384  # per worker: bounds memory while writing

  def validate(self) -> None:
    """Raises ValueError naming the flag when the configuration is inconsistent."""
    if self.source not in readers.SOURCES:
      raise ValueError(f"--source={self.source!r}: choose from {', '.join(readers.SOURCES)}")
    if not self.input:
      raise ValueError("--input is required")
    if not self.output_dir:
      raise ValueError("--output_dir is required")
    if self.max_seq_len < 1:
      raise ValueError(f"--max_seq_len={self.max_seq_len}: must be >= 1")
    if self.samples not in mf.SAMPLES:
      raise ValueError(f"--samples={self.samples!r}: choose from {', '.join(mf.SAMPLES)}")
    if self.holdout not in mf.HOLDOUT_SPLITS:
      raise ValueError(f"--holdout={self.holdout!r}: choose from "
                       f"{', '.join(mf.HOLDOUT_SPLITS)}")
    if self.compression not in mf.COMPRESSIONS:
      raise ValueError(f"--compression={self.compression!r}: choose from "
                       f"{', '.join(mf.COMPRESSIONS)}")
    for name in ("max_samples_per_user", "min_user_clicks", "min_item_clicks"):
      if getattr(self, name) < 0:
        raise ValueError(f"--{name}={getattr(self, name)}: must be >= 0")
    if self.num_shards < 1:
      raise ValueError(f"--num_shards={self.num_shards}: must be >= 1")
    if self.source in readers.COLUMN_SOURCES:
      if self.csv is None or not self.csv.user_col or not self.csv.item_col:
        raise ValueError(f"--source={self.source} needs --user_col and --item_col")
      if self.csv.time_unit not in readers.TIME_UNITS:
        raise ValueError(f"--time_unit={self.csv.time_unit!r}: choose from "
                         f"{', '.join(readers.TIME_UNITS)}")
      self._check_csv_columns()
    if self.examples_per_chunk < 1:
      raise ValueError("examples_per_chunk must be >= 1")
    if self.num_workers < 0:
      raise ValueError(f"--num_workers={self.num_workers}: must be >= 0")

  def _check_csv_columns(self) -> None:
    """One column per flag, a one-character --delimiter, distinct --column_names."""
    named = [(flag, getattr(self.csv, flag)) for flag in
             ("user_col", "item_col", "time_col", "category_col") if getattr(self.csv, flag)]
    for i, (flag, column) in enumerate(named):
      for other, same in named[i + 1:]:
        if same == column:
          raise ValueError(f"--{flag}={column} and --{other}={same} name the same column; each "
                           "flag needs a column of its own")
    if self.source == "csv":
      # pyarrow's CSV parser splits on one character only.
      if len(self.csv.delimiter) != 1 or self.csv.delimiter in "\r\n\"":
        raise ValueError(f"--delimiter={self.csv.delimiter!r}: must be one character other "
                         "than a quote or a line break (or 'tab')")
      names = self.csv.column_names
      repeated = sorted({n for n in names if names.count(n) > 1})
      if repeated:
        raise ValueError(f"--column_names: {repeated[0]!r} appears {names.count(repeated[0])} "
                         "times; each column needs a name of its own")

  def resolved_num_workers(self) -> int:
    if "fork" not in multiprocessing.get_all_start_methods():
      return 1
    if self.num_workers:
      return self.num_workers
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

  def replaceable(self) -> dict[str, Any]:
    """check_replaceable's and atomic_directory's arguments for --output_dir."""
    return dict(overwrite=self.overwrite, own_file=mf.MANIFEST_FILE,
                inputs=tuple(p for p in (self.input, self.movies) if p))

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d.pop("examples_per_chunk")
    d.pop("num_workers")  # does not change the output
    return d


@dataclasses.dataclass
class CleanLog:
  """Clicks after cleaning, sorted by (user raw id, time, source row)."""
  user_id: np.ndarray
  item_id: np.ndarray
  ts: np.ndarray
  # Items passing --min_item_clicks (None: no filter); item-table rows outside
  # it, never-clicked ones included, leave the vocabulary.
  kept_item_ids: np.ndarray | None
  counts: dict[str, int]


def _factorized_counts(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  codes, uniques = pd.factorize(values)
  return codes, uniques, np.bincount(codes, minlength=len(uniques))


def _drop_exact_duplicates(user, item, ts) -> np.ndarray:
  """Mask of rows to keep, for arrays sorted by (user, time, file order).

  An exact duplicate shares user and time with its original, so only rows
  in runs of equal (user, time) need hashing; the first occurrence in file
  order is kept.
  """
  keep = np.ones(len(user), dtype=bool)
  same = (user[1:] == user[:-1]) & (ts[1:] == ts[:-1])
  in_run = np.zeros(len(user), dtype=bool)
  in_run[1:] |= same
  in_run[:-1] |= same
  tied = np.flatnonzero(in_run)
  if len(tied):
    dup = pd.DataFrame({"u": user[tied], "i": item[tied], "t": ts[tied]}).duplicated()
    keep[tied[dup.to_numpy()]] = False
  return keep


def no_clicks_left(clicks_file: str, min_item_clicks: int, min_user_clicks: int) -> DataError:
  return DataError(f"{clicks_file}: no clicks left after --min_item_clicks={min_item_clicks} "
                   f"and --min_user_clicks={min_user_clicks}")


def no_examples(config: "PreprocessConfig", split: str) -> DataError:
  return DataError(f"--input={config.input}: no {split} examples (every user is too short "
                   f"for --holdout={config.holdout}?)")


def clean_log(log: readers.RawLog, min_item_clicks: int, min_user_clicks: int) -> CleanLog:
  counts = {"input_rows": len(log.user_id)}
  # Times that go backwards within a user, in file order: the input was not
  # sorted; the sort below fixes it and the manifest records how much.
  by_user = np.argsort(log.user_id, kind="stable")
  t_by_user = log.ts[by_user]
  backwards = (np.diff(log.user_id[by_user]) == 0) & (np.diff(t_by_user) < 0)
  counts["out_of_order_rows"] = int(np.count_nonzero(backwards))
  del by_user, t_by_user, backwards
  # lexsort is stable: equal (user, time) keep file order.
  order = np.lexsort((log.ts, log.user_id))
  user, item, ts = log.user_id[order], log.item_id[order], log.ts[order]
  del order
  keep = _drop_exact_duplicates(user, item, ts)
  counts["duplicate_rows_dropped"] = int(len(keep) - keep.sum())

  kept_items = None
  if min_item_clicks > 0:
    codes, uniques, per_item = _factorized_counts(item[keep])
    kept_items = np.asarray(uniques[per_item >= min_item_clicks], dtype=np.int64)
    before = keep.sum()
    keep[keep] = per_item[codes] >= min_item_clicks
    counts["rows_dropped_min_item_clicks"] = int(before - keep.sum())
  else:
    counts["rows_dropped_min_item_clicks"] = 0
  if min_user_clicks > 0:
    codes, _, per_user = _factorized_counts(user[keep])
    before = keep.sum()
    keep[keep] = per_user[codes] >= min_user_clicks
    counts["users_dropped_min_user_clicks"] = int((per_user < min_user_clicks).sum())
    counts["rows_dropped_min_user_clicks"] = int(before - keep.sum())
  else:
    counts["users_dropped_min_user_clicks"] = counts["rows_dropped_min_user_clicks"] = 0
  if not keep.any():
    raise no_clicks_left(log.clicks_file, min_item_clicks, min_user_clicks)
  if not keep.all():
    user, item, ts = user[keep], item[keep], ts[keep]
  counts["clicks"] = len(user)
  return CleanLog(user, item, ts, kept_items, counts)


@dataclasses.dataclass
class ItemVocabulary:
  """Items and categories; row i of each table describes index i."""
  items: pa.Table  # ITEM_COLUMNS except target_count
  categories: pa.Table  # CATEGORY_COLUMNS
  item_category: np.ndarray  # int32 [num_items + 1]: category index of each item index
  counts: dict[str, int]
  sorted_ids: np.ndarray  # the items' raw ids (int64 or string codes), sorted
  rank: np.ndarray  # index - 1 of each of sorted_ids

  @property
  def size(self) -> int:
    return len(self.item_category)

  def index_of(self, item_ids: np.ndarray) -> np.ndarray:
    """Raw ids (all in the vocabulary) -> item indices (int32)."""
    return (self.rank[np.searchsorted(self.sorted_ids, item_ids)] + 1).astype(np.int32)


def _with_padding_row(values: np.ndarray, null: np.ndarray | None = None) -> pa.Array:
  """int64 column with a null padding row 0 prepended."""
  values = np.concatenate([[0], np.asarray(values, dtype=np.int64)])
  mask = np.concatenate([[True], np.zeros(len(values) - 1, bool) if null is None else null])
  return pa.array(values, mask=mask)


def _raw_id_column(values: np.ndarray, dictionary: np.ndarray | None,
                   null: np.ndarray | None = None) -> pa.Array:
  """Raw ids with a null padding row 0: int64, or the strings the codes stand for."""
  if dictionary is None:
    return _with_padding_row(values, null)
  strings = dictionary[np.asarray(values, dtype=np.int64)]
  if null is not None and null.any():
    strings = np.where(null, None, strings)
  return pa.array(np.concatenate([[None], strings]), pa.string())


def _nullable(column: pd.Series) -> tuple[np.ndarray, np.ndarray]:
  return column.to_numpy(dtype=np.int64, na_value=0), column.isna().to_numpy()


def build_item_vocabulary(log: readers.RawLog, clean: CleanLog,
                          train_mask: np.ndarray) -> tuple[ItemVocabulary, np.ndarray]:
  """Item and category vocabularies; returns them and every click's item index."""
  clicked, code = np.unique(clean.item_id, return_inverse=True)
  vocab = item_vocabulary(log, clean.kept_item_ids, clicked,
                          train_clicks=np.bincount(code[train_mask], minlength=len(clicked)),
                          all_clicks=np.bincount(code, minlength=len(clicked)))
  return vocab, vocab.index_of(clicked)[code]  # a lookup per distinct item, not per click


def item_vocabulary(log: readers.RawLog, kept_item_ids: np.ndarray | None, clicked: np.ndarray,
                    train_clicks: np.ndarray, all_clicks: np.ndarray) -> ItemVocabulary:
  """Item and category vocabularies from clicks counted per item.

  Items are the clicked ones (`clicked`, sorted raw ids; their training and
  all clicks) plus every row of the source's item table (the notebooks index
  all articles, clicked or not), minus --min_item_clicks drops
  (`kept_item_ids`). Index order is training clicks descending, ties by raw id.
  """
  features = log.items if log.items is not None else pd.DataFrame(
      {"item_id": np.zeros(0, np.int64)})
  if kept_item_ids is not None:
    features = features[features["item_id"].isin(kept_item_ids)]
  universe = np.union1d(clicked, features["item_id"].to_numpy(np.int64))
  at = np.searchsorted(universe, clicked)
  train_per_item = np.zeros(len(universe), np.int64)
  train_per_item[at] = train_clicks
  clicks_per_item = np.zeros(len(universe), np.int64)
  clicks_per_item[at] = all_clicks
  order = np.lexsort((universe, -train_per_item))
  rank = np.empty(len(universe), dtype=np.int64)
  rank[order] = np.arange(len(universe))
  item_ids = universe[order]

  by_item = features.set_index("item_id").reindex(item_ids)
  empty = pd.Series(pd.arrays.IntegerArray(np.zeros(len(item_ids), np.int64),
                                           np.ones(len(item_ids), bool)))
  raw_category = by_item["category_id"] if "category_id" in by_item else empty
  cat_values, cat_null = _nullable(raw_category)
  named = (log.category_names["category_id"].to_numpy(np.int64)
           if log.category_names is not None else np.zeros(0, np.int64))
  category_ids = np.unique(np.concatenate([cat_values[~cat_null], named]))
  item_category = np.zeros(len(item_ids) + 1, dtype=np.int32)
  item_category[1:] = np.where(cat_null, 0, np.searchsorted(category_ids, cat_values) + 1)

  columns = {
      "index": pa.array(np.arange(len(item_ids) + 1, dtype=np.int32)),
      "item_id": _raw_id_column(item_ids, log.dictionaries.get("item")),
      "category": pa.array(item_category),
      "category_id": _raw_id_column(cat_values, log.dictionaries.get("category"), cat_null),
  }
  for name in ("created_at_ts", "words_count"):
    columns[name] = _with_padding_row(*_nullable(by_item[name] if name in by_item else empty))
  columns["train_clicks"] = pa.array(np.concatenate([[0], train_per_item[order]]))
  items = pa.table(columns)

  names = pd.Series(dtype=object)
  if log.category_names is not None:
    names = log.category_names.set_index("category_id")["name"]
  category_names = names.reindex(category_ids)
  categories = pa.table({
      "index": pa.array(np.arange(len(category_ids) + 1, dtype=np.int32)),
      "category_id": _raw_id_column(category_ids, log.dictionaries.get("category")),
      "name": pa.array(np.concatenate([[None], category_names.to_numpy(dtype=object)]),
                       type=pa.string(), from_pandas=True),
      "num_items": pa.array(np.bincount(item_category[1:], minlength=len(category_ids) + 1)
                            .astype(np.int64)),
  })
  in_table = np.isin(item_ids, features["item_id"].to_numpy(np.int64))
  item_clicks = clicks_per_item[order]
  counts = {
      "items": len(item_ids),
      "clicked_items": int((item_clicks > 0).sum()),
      "items_without_clicks": int((item_clicks == 0).sum()),
      "items_without_features": int((~in_table).sum()) if log.items is not None else 0,
      "categories": len(category_ids),
  }
  return ItemVocabulary(items, categories, item_category, counts, universe, rank)


def group_users(user_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Sorted user raw ids -> (raw id of user index 1..U, CSR offsets)."""
  first = np.flatnonzero(np.concatenate([[True], user_id[1:] != user_id[:-1]]))
  return user_id[first], np.append(first, len(user_id)).astype(np.int64)


def user_histories_table(seqs: sq.Sequences, holdout: sq.Holdout, user_ids: pa.Array,
                         train_mask: np.ndarray, large_lists: bool | None = None) -> pa.Table:
  """The USER_HISTORIES_FILE rows of the users of `seqs` (as users 1..U);
  `user_ids`: their raw ids (int64 or string). `large_lists`: large_list<>
  columns (default: when the training clicks overflow list<>'s int32 offsets)."""
  offsets = np.concatenate([[0], np.cumsum(holdout.train_end - seqs.starts)])
  if large_lists is None:
    large_lists = offsets[-1] >= 2**31
  list_type = pa.LargeListArray if large_lists else pa.ListArray
  list_offsets = pa.array(offsets.astype(np.int64 if large_lists else np.int32))
  columns = {
      "user": pa.array(np.arange(1, seqs.num_users + 1, dtype=np.int32)),
      "user_id": user_ids,
      "history": list_type.from_arrays(list_offsets, pa.array(seqs.items[train_mask])),
      "history_ts": list_type.from_arrays(list_offsets, pa.array(seqs.ts[train_mask])),
  }
  for split in (mf.VALID, mf.TEST):
    flat = holdout.targets.get(split, np.full(seqs.num_users, -1))
    held = flat >= 0
    columns[f"{split}_item"] = pa.array(np.where(held, seqs.items[flat], 0).astype(np.int32))
    columns[f"{split}_ts"] = pa.array(np.where(held, seqs.ts[flat], 0), mask=~held)
  return pa.table(columns)


def users_table(user_ids: np.ndarray, num_clicks: np.ndarray,
                dictionary: np.ndarray | None) -> pa.Table:
  """USERS_FILE: user index 0 (padding) .. U, raw id, clicks after cleaning."""
  return pa.table({
      "index": pa.array(np.arange(len(user_ids) + 1, dtype=np.int32)),
      "user_id": _raw_id_column(user_ids, dictionary),
      "num_clicks": pa.array(np.concatenate([[0], num_clicks]).astype(np.int64)),
  })


def example_features(seqs: sq.Sequences, targets: np.ndarray, item_category: np.ndarray,
                     max_seq_len: int) -> dict[str, np.ndarray]:
  """The TFRecord features of the examples whose targets are `targets` (flat indices)."""
  users = seqs.user_of(targets)
  history, length = sq.pad_left_ragged(seqs.items, seqs.starts[users - 1], targets, max_seq_len)
  target = seqs.items[targets]
  return {
      mf.FEATURE_USER: users,
      mf.FEATURE_HISTORY: history,
      mf.FEATURE_LENGTH: length,
      mf.FEATURE_TARGET: target,
      mf.FEATURE_TARGET_CATEGORY: item_category[target],
  }


def build_manifest(config: PreprocessConfig, log: readers.RawLog, counts: dict[str, int],
                   vocab: ItemVocabulary, splits: dict[str, mf.SplitInfo],
                   num_users: int) -> mf.Manifest:
  return mf.Manifest(
      source={"type": config.source, "time_unit": log.time_unit,
              "inputs": [str(Path(p).absolute()) for p in log.inputs],
              "id_types": log.id_types()},
      flags=config.to_dict(),
      max_seq_len=config.max_seq_len,
      samples=config.samples,
      holdout=config.holdout,
      compression=config.compression,
      counts={**counts, **vocab.counts, "users": num_users,
              **{f"examples_{s}": info.num_examples for s, info in splits.items()}},
      vocab_sizes={"items": vocab.size, "users": num_users + 1,
                   "categories": vocab.categories.num_rows},
      splits=splits,
  )


# State shared with forked shard writers (inherited copy-on-write, not pickled).
_SHARD_CONTEXT: dict[str, Any] = {}


def _write_shard(job: tuple[str, int, int, np.ndarray]) -> mf.ShardInfo:
  split, shard, num_shards, targets = job
  ctx = _SHARD_CONTEXT
  seqs, config = ctx["seqs"], ctx["config"]
  relative = mf.shard_file_name(split, shard, num_shards, config.compression)
  with TFRecordFileWriter(ctx["out_dir"] / relative, config.compression) as writer:
    for begin in range(0, len(targets), config.examples_per_chunk):
      writer.write_examples(example_features(
          seqs, targets[begin:begin + config.examples_per_chunk], ctx["item_category"],
          config.max_seq_len))
    sha = writer.close()
  return mf.ShardInfo(relative, len(targets), writer.bytes_written, sha)


def _write_splits(out_dir: Path, targets: dict[str, np.ndarray], seqs: sq.Sequences,
                  item_category: np.ndarray, config: PreprocessConfig) -> dict[str, mf.SplitInfo]:
  """Writes every split as equal shards of its targets (in the given order).

  Shards are independent files, so --num_workers forked processes write them
  in parallel (numpy and zlib only: safe to fork); the output is identical
  to a single process.
  """
  jobs = []
  for split, split_targets in targets.items():
    if len(split_targets) == 0:
      raise no_examples(config, split)
    (out_dir / split).mkdir(parents=True, exist_ok=True)
    num_shards = min(config.num_shards, len(split_targets))
    jobs += [(split, shard, num_shards, part)
             for shard, part in enumerate(np.array_split(split_targets, num_shards))]
  _SHARD_CONTEXT.update(out_dir=out_dir, seqs=seqs, item_category=item_category, config=config)
  workers = min(config.resolved_num_workers(), len(jobs))
  total = sum(len(t) for t in targets.values())
  infos: list[mf.ShardInfo | None] = [None] * len(jobs)
  start, written = time.perf_counter(), 0
  try:
    results = _in_processes(jobs, workers) if workers > 1 else \
        ((i, _write_shard(job)) for i, job in enumerate(jobs))
    for i, info in results:
      infos[i] = info
      split, shard, num_shards, _ = jobs[i]
      written += info.num_examples
      logging.info("%s: shard %d/%d done; %d/%d examples, %.0f examples/s", split, shard + 1,
                   num_shards, written, total, written / max(time.perf_counter() - start, 1e-9))
  finally:
    _SHARD_CONTEXT.clear()
  shards: dict[str, list[mf.ShardInfo]] = {split: [] for split in targets}
  for (split, _, _, _), info in zip(jobs, infos):
    shards[split].append(info)
  return {split: mf.SplitInfo(sum(s.num_examples for s in infos), tuple(infos))
          for split, infos in shards.items()}


def _shard_process(conn, jobs: list, indices: list[int]) -> None:
  """A forked writer: writes its shards in order, sends (index, info) for each,
  or (index, None, exception) for the first that fails, then exits."""
  i = -1
  try:
    for i in indices:
      conn.send((i, _write_shard(jobs[i]), None))
  except BaseException as e:  # reported to the parent, which decides
    try:
      conn.send((i, None, e))
    except Exception:  # the exception does not pickle
      conn.send((i, None, RuntimeError(f"{type(e).__name__}: {e}")))
  finally:
    conn.close()


def _in_processes(jobs: list, workers: int):
  """Yields (job index, ShardInfo) from `workers` forked processes, each a
  fixed share of the jobs (every `workers`-th). Plain processes and one pipe
  each, not multiprocessing.Pool: Pool.terminate() after a worker's error can
  wait for ever on a lock an idle worker holds; here an error kills the
  others and the first failure is raised in this process."""
  context = multiprocessing.get_context("fork")
  running = {}
  try:
    for w in range(workers):
      receive, send = context.Pipe(duplex=False)
      process = context.Process(target=_shard_process, daemon=True,
                                args=(send, jobs, list(range(w, len(jobs), workers))))
      process.start()
      send.close()
      running[receive] = process
    while running:
      for conn in multiprocessing.connection.wait(list(running)):
        try:
          i, info, error = conn.recv()
        except EOFError:  # the process has sent everything and exited, or died
          process = running.pop(conn)
          process.join()
          conn.close()
          if process.exitcode != 0:
            raise DataError(f"a shard writer process exited with code {process.exitcode} "
                            "(killed? out of memory?)") from None
          continue
        if error is not None:
          raise error
        yield i, info
  finally:
    for process in running.values():
      if process.is_alive():
        process.kill()
    for conn, process in running.items():
      process.join()
      conn.close()


def run(config: PreprocessConfig) -> mf.Manifest:
  """Runs the whole job; returns the manifest of the finished output directory."""
  config.validate()
  output_dir = Path(config.output_dir)
  replaceable = config.replaceable()
  check_replaceable(output_dir, **replaceable)  # before reading the input
  with locked_output(output_dir, "preprocess"):  # and before reading: a busy or unwritable output
    return _run_locked(config, output_dir, replaceable)


def _run_locked(config: PreprocessConfig, output_dir: Path, replaceable: dict) -> mf.Manifest:
  started = time.perf_counter()
  log = readers.read_source(config.source, config.input, config.csv, config.movies or None)
  logging.info("read %d rows from %s in %.1fs", len(log.user_id), ", ".join(log.inputs),
               time.perf_counter() - started)

  clean = clean_log(log, config.min_item_clicks, config.min_user_clicks)
  # The cleaned, sorted copy replaces the raw columns; free them early.
  no_rows = np.zeros(0, np.int64)
  log = dataclasses.replace(log, user_id=no_rows, item_id=no_rows, ts=no_rows)
  user_ids, offsets = group_users(clean.user_id)
  raw_seqs = sq.Sequences(clean.item_id, clean.ts, offsets)  # raw item ids: holdout only
  holdout = sq.split_holdout(raw_seqs, config.holdout)
  train_mask = holdout.train_mask(raw_seqs)
  vocab, item_index = build_item_vocabulary(log, clean, train_mask)
  seqs = sq.Sequences(item_index, clean.ts, offsets)
  counts = dict(clean.counts)
  del clean, raw_seqs

  targets = {mf.TRAIN: sq.train_targets(seqs, holdout, config.samples, config.max_seq_len,
                                        config.max_samples_per_user)}
  predicted = sq.per_position_target_mask(seqs, targets[mf.TRAIN], config.samples,
                                          config.max_seq_len)
  target_count = np.bincount(seqs.items[predicted], minlength=vocab.size).astype(np.int64)
  target_count[0] = 0
  rng = np.random.default_rng(config.seed)
  targets[mf.TRAIN] = targets[mf.TRAIN][rng.permutation(len(targets[mf.TRAIN]))]
  for split in mf.HOLDOUT_SPLITS[config.holdout]:
    flat = holdout.targets[split]
    targets[split] = flat[flat >= 0]

  users = users_table(user_ids, seqs.lengths, log.dictionaries.get("user"))
  examples_per_user = np.bincount(seqs.user_of(targets[mf.TRAIN]), minlength=len(offsets))[1:]
  counts.update(
      train_clicks=int(train_mask.sum()),
      users_without_holdout=int((holdout.targets[mf.VALID] < 0).sum()),
      users_without_train_examples=int((examples_per_user == 0).sum()),
  )

  with output_errors(output_dir), atomic_directory(output_dir, **replaceable) as tmp:
    (tmp / "vocab").mkdir()
    pq.write_table(vocab.items.append_column("target_count", pa.array(target_count)),
                   tmp / mf.ITEMS_FILE)
    pq.write_table(users, tmp / mf.USERS_FILE)
    pq.write_table(vocab.categories, tmp / mf.CATEGORIES_FILE)
    pq.write_table(user_histories_table(seqs, holdout, users.column("user_id").slice(1),
                                        train_mask),
                   tmp / mf.USER_HISTORIES_FILE, row_group_size=mf.USER_HISTORIES_ROW_GROUP)
    splits = _write_splits(tmp, targets, seqs, vocab.item_category, config)
    manifest = build_manifest(config, log, counts, vocab, splits, len(user_ids))
    mf.write(manifest, tmp)
  logging.info("wrote %s in %.1fs: %s", output_dir, time.perf_counter() - started,
               ", ".join(f"{s} {i.num_examples} examples" for s, i in splits.items()))
  return mf.load(output_dir)
