"""preprocess --mode=ranking: retrieval candidates -> ranking examples.

Inputs: a preprocess output directory, the output directories of the
retrieval job (its job.json says which held-out click each one's lists
were made for), and the retrieval model's item embeddings (by default the
export of the model the retrieval job used).

Splits (the ranker must be evaluated on clicks it never trained on):
  --holdout=valid_test data: training examples are the candidates retrieved
    for the validation click (query: training clicks), evaluation examples
    the candidates for the test click (query: training clicks + the
    validation click).
  --holdout=last data: the candidates for the validation click; users are
    split at random (seeded) into training and evaluation users, 80/20 as in
    the notebook.
Training keeps every positive and at most --negatives_per_user random
negatives per user; evaluation keeps every candidate.

The dense features (manifest.DENSE_FEATURES), for user u, candidate c and
the split's query history H (the clicks before the held-out one; "last"
is the last click of H, its time is the query time t):
  recall_score, recall_rank  from the retrieval job's list
  user_click_count           |H|
  user_unique_items          distinct items in H
  item_click_count           c's clicks in the training clicks of all users
  words_count                c's words_count (0 when unknown)
  item_age_hours             t - created_at(c)
  time_gap_hours             created_at(last) - created_at(c): how much
                             older the candidate is than what the user just read
  emb_sim_last               cosine of the item embeddings of c and last
  is_same_category           category(c) == category(last), both known
  transitions_from_last      (not in the notebook) how often a training click
                             on `last` was directly followed by one on c, over
                             all users: the first-order Markov signal, which a
                             most-recent-item baseline shows sequence models
                             do not fully capture
Times are in hours when the log has times (ms or s) and created_at is
known, else 0. No feature reads the held-out click: H ends before it, t is
the time of H's last click (not of the held-out one), and item counts come
from training clicks only (tests/test_ranking_data.py changes the held-out
click and checks every feature stays the same).
"""

import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from absl import logging

from contracts import histories
from contracts import manifest as mf
from contracts import sequences as sq
from contracts.candidates import (CANDIDATE_COLUMNS, CANDIDATES_DIR, ITEM_COLUMN, JOB_FILE,
                                  SUCCESS_FILE, item_column)
from contracts.errors import ConfigError, DataError
from contracts.export_manifest import EXPORT_DIR, data_fingerprint, load_info
from contracts.fileio import (atomic_directory, check_replaceable, locked_output, output_errors,
                              sha256_file)
from contracts.vocab import Vocabulary
from preprocess.tfrecord_writer import TFRecordFileWriter

NEGATIVE_SAMPLING = ("random", "top", "mixed")
HOURS_PER_UNIT = {"ms": 1 / 3_600_000, "s": 1 / 3600}  # "order" has no clock


@dataclasses.dataclass(frozen=True)
class RankingConfig:
  """Everything that determines a ranking data directory (saved in its manifest)."""
  data_dir: str
  candidates: tuple[str, ...]
  output_dir: str
  item_embeddings: str = ""  # trainer model_dir or .npy; "": the retrieval job's model
  max_hist_len: int = 30
  negatives_per_user: int = 20  # 0: keep every negative
  negative_sampling: str = "random"  # random | top | mixed (see cap_negatives)
  eval_users_fraction: float = 0.2  # --holdout=last data only
  num_shards: int = 4
  compression: str = "GZIP"
  seed: int = 42
  overwrite: bool = False
  examples_per_chunk: int = 65536

  def validate(self) -> None:
    if not self.data_dir:
      raise ConfigError("--data_dir is required with --mode=ranking")
    if not self.candidates:
      raise ConfigError("--candidates is required with --mode=ranking (retrieval output dirs)")
    if not self.output_dir:
      raise ConfigError("--output_dir is required")
    if self.max_hist_len < 1:
      raise ConfigError(f"--max_hist_len={self.max_hist_len}: must be >= 1")
    if self.negative_sampling not in NEGATIVE_SAMPLING:
      raise ConfigError(f"--negative_sampling={self.negative_sampling}: choose from "
                        f"{', '.join(NEGATIVE_SAMPLING)}")
    if self.negatives_per_user < 0:
      raise ConfigError(f"--negatives_per_user={self.negatives_per_user}: must be >= 0")
    if not 0 < self.eval_users_fraction < 1:
      raise ConfigError(f"--eval_users_fraction={self.eval_users_fraction}: must be in (0, 1)")
    if self.num_shards < 1:
      raise ConfigError(f"--num_shards={self.num_shards}: must be >= 1")
    if self.compression not in mf.COMPRESSIONS:
      raise ConfigError(f"--compression={self.compression}: choose from "
                        f"{', '.join(mf.COMPRESSIONS)}")

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d.pop("examples_per_chunk")
    d["candidates"] = list(self.candidates)
    return d


@dataclasses.dataclass
class Candidates:
  """One retrieval output: (user, item) index pairs with the retrieval's score and rank."""
  directory: Path
  split: str  # the held-out click its lists were made for
  job: dict
  user: np.ndarray  # int64 user index
  item: np.ndarray  # int64 item index
  score: np.ndarray  # float32
  rank: np.ndarray  # int32, 1-based


def read_candidates(directory: Path | str, manifest: mf.Manifest, items: Vocabulary,
                    users: Vocabulary) -> Candidates:
  """Reads a finished retrieval output made from `manifest`'s data (DataError otherwise)."""
  directory = Path(directory).absolute()
  job_file = directory / JOB_FILE
  if not job_file.is_file():
    raise DataError(f"--candidates={directory}: no {JOB_FILE} (not a retrieval job "
                    "output directory)")
  try:
    job = json.loads(job_file.read_text())
  except (OSError, ValueError) as e:
    raise DataError(f"--candidates={directory}: {JOB_FILE} is unreadable ({e})") from None
  if not (directory / SUCCESS_FILE).is_file():
    raise DataError(f"--candidates={directory}: no {SUCCESS_FILE}; the retrieval job "
                    "has not finished (re-run it to complete the missing parts)")
  if job.get("data_fingerprint") != data_fingerprint(manifest):
    raise DataError(f"--candidates={directory}: made from another data directory than "
                    f"{manifest.data_dir} (its item vocabulary differs)")
  split = job.get("eval_split")
  if split not in manifest.eval_splits:
    raise DataError(f"--candidates={directory}: made with --eval_split={split}; ranking data "
                    f"needs lists for a held-out click ({', '.join(manifest.eval_splits)})")
  parts = sorted((directory / CANDIDATES_DIR).glob("part-*.parquet"))
  if not parts:
    raise DataError(f"--candidates={directory}: no {CANDIDATES_DIR}/part-*.parquet")
  # An output of an older retrieval names the item column otherwise: read under its name.
  item_col = item_column(job, str(job_file))
  columns = [item_col if c == ITEM_COLUMN else c for c in CANDIDATE_COLUMNS]
  tables = []
  for part in parts:
    try:
      tables.append(pq.read_table(part, columns=columns))
    except (OSError, KeyError, ValueError) as e:
      raise DataError(f"{part}: cannot read candidate columns {', '.join(columns)} ({e})") from e
  raw_user = np.concatenate([t.column("user_id").to_numpy() for t in tables])
  raw_item = np.concatenate([t.column(item_col).to_numpy() for t in tables])
  user, item = users.lookup(raw_user).astype(np.int64), items.lookup(raw_item).astype(np.int64)
  for name, index, raw in (("user_id", user, raw_user), (item_col, item, raw_item)):
    unknown = np.flatnonzero(index == 0)
    if len(unknown):
      raise DataError(f"--candidates={directory}: {name} {raw[unknown[0]]} (row "
                      f"{unknown[0] + 1} of the parts in name order) is not in "
                      f"{manifest.data_dir}'s vocabulary: candidates from another data_dir")
  return Candidates(directory, split, job, user, item,
                    np.concatenate([t.column("recall_score").to_numpy() for t in tables]),
                    np.concatenate([t.column("recall_rank").to_numpy() for t in tables]))


def load_item_embeddings(source: str, manifest: mf.Manifest) -> tuple[np.ndarray, Path]:
  """Unit-length item embeddings [num_items, D] from a model_dir's export or a .npy file."""
  path = Path(source)
  if path.is_dir():
    info = load_info(path)
    if info.data_fingerprint != data_fingerprint(manifest):  # item vectors: items only
      raise DataError(f"--item_embeddings={path}: the model was trained on another item "
                      f"vocabulary than {manifest.data_dir}")
    path = path / EXPORT_DIR / info.item_embeddings
  if not path.is_file():
    raise DataError(f"--item_embeddings: {path} is missing (pass a trainer model_dir with "
                    "export/item_embeddings.npy, or the .npy file)")
  try:
    vectors = np.load(path).astype(np.float32)
  except (OSError, ValueError) as e:
    raise DataError(f"{path}: cannot read item embeddings ({e})") from e
  num_items = manifest.vocab_sizes["items"]
  if vectors.ndim != 2 or len(vectors) != num_items:
    raise DataError(f"{path}: shape {vectors.shape}, expected ({num_items}, dim): embeddings "
                    f"of another item vocabulary than {manifest.data_dir}")
  norms = np.linalg.norm(vectors, axis=1, keepdims=True)
  return vectors / np.maximum(norms, 1e-12), path


@dataclasses.dataclass
class ItemFeatures:
  """Per item index (row 0 = padding), and item-to-item transitions."""
  category: np.ndarray  # int64, 0 = unknown
  created_at: np.ndarray  # float64, NaN = unknown
  words_count: np.ndarray  # float64, 0 = unknown
  train_clicks: np.ndarray  # float64
  # Consecutive training clicks (a -> b) of every user, as sorted keys
  # a * num_items + b and their counts.
  transition_keys: np.ndarray
  transition_counts: np.ndarray

  @classmethod
  def read(cls, manifest: mf.Manifest, histories_table) -> "ItemFeatures":
    table = pq.read_table(manifest.path(mf.ITEMS_FILE),
                          columns=["category", "created_at_ts", "words_count", "train_clicks"])
    created = table.column("created_at_ts").to_numpy(zero_copy_only=False)
    history = histories_table.column("history").combine_chunks()
    values = history.flatten().to_numpy().astype(np.int64)
    offsets = history.offsets.to_numpy().astype(np.int64)
    offsets -= offsets[0]
    follows = np.ones(len(values), bool)  # click i + 1 follows click i of the same user
    follows[offsets[1:] - 1] = False
    follows = follows[:-1] if len(values) else follows
    keys, counts = np.unique(values[:-1][follows] * table.num_rows + values[1:][follows],
                             return_counts=True)
    return cls(category=table.column("category").to_numpy().astype(np.int64),
               created_at=np.asarray(created, dtype=np.float64),
               words_count=np.nan_to_num(np.asarray(
                   table.column("words_count").to_numpy(zero_copy_only=False), np.float64)),
               train_clicks=table.column("train_clicks").to_numpy().astype(np.float64),
               transition_keys=keys, transition_counts=counts.astype(np.float64))

  def transitions(self, source: np.ndarray, target: np.ndarray) -> np.ndarray:
    keys = source.astype(np.int64) * len(self.category) + target
    at = np.minimum(np.searchsorted(self.transition_keys, keys), len(self.transition_keys) - 1)
    found = (len(self.transition_keys) > 0) & (self.transition_keys[at] == keys)
    return np.where(found, self.transition_counts[at] if len(self.transition_keys) else 0.0, 0.0)


@dataclasses.dataclass
class UserContext:
  """Per user index (row u = user u, row 0 unused): the split's query and its target."""
  queries: histories.Queries  # row u - 1 = user u
  target: np.ndarray  # int64 [U + 1], 0 = no held-out click
  last_item: np.ndarray  # int64 [U + 1], 0 = empty history
  last_time: np.ndarray  # float64 [U + 1], NaN = empty history
  click_count: np.ndarray  # float64 [U + 1]
  unique_items: np.ndarray  # float64 [U + 1]


def user_context(table, split: str) -> UserContext:
  """The query of every user for `split` from user_histories.parquet columns.

  Only the history (and for test the validation click) is read for
  features; the split's own held-out item is kept apart as the label.
  """
  users = table.column("user").to_numpy().astype(np.int64)
  if not np.array_equal(users, np.arange(1, len(users) + 1)):
    raise DataError("user_histories.parquet: rows are not users 1..n in order")
  queries = histories.queries_from_table(table, split)
  history_ts = table.column("history_ts").combine_chunks()
  ts_values = history_ts.flatten().to_numpy().astype(np.float64)
  ts_offsets = history_ts.offsets.to_numpy().astype(np.int64)
  ts_offsets -= ts_offsets[0]
  length = np.diff(ts_offsets)
  last_time = np.full(len(users), np.nan)
  last_time[length > 0] = ts_values[ts_offsets[1:][length > 0] - 1]
  if split == mf.TEST:  # the query ends with the validation click
    valid_item = table.column(f"{mf.VALID}_item").to_numpy()
    valid_ts = np.asarray(table.column(f"{mf.VALID}_ts").to_numpy(zero_copy_only=False),
                          np.float64)
    last_time = np.where(valid_item > 0, valid_ts, last_time)
  q_length = np.diff(queries.offsets)
  last_item = np.zeros(len(users), np.int64)
  last_item[q_length > 0] = queries.values[queries.offsets[1:][q_length > 0] - 1]
  # Distinct (row, item) pairs, as one int64 key each, counted per row.
  stride = int(queries.values.max(initial=0)) + 1
  rows = np.repeat(np.arange(len(users), dtype=np.int64), q_length)
  unique = np.bincount(np.unique(rows * stride + queries.values) // stride,
                       minlength=len(users))

  def padded(x, fill=0):
    return np.concatenate([[fill], x])

  return UserContext(queries, padded(queries.target), padded(last_item),
                     padded(last_time, np.nan), padded(q_length.astype(np.float64)),
                     padded(unique.astype(np.float64)))


def dense_features(ctx: UserContext, items: ItemFeatures, unit_embeddings: np.ndarray,
                   time_unit: str, user: np.ndarray, candidate: np.ndarray,
                   recall_score: np.ndarray, recall_rank: np.ndarray) -> np.ndarray:
  """float32 [n, len(DENSE_FEATURES)] for rows (user, candidate); see the module docstring."""
  last = ctx.last_item[user]
  hours = HOURS_PER_UNIT.get(time_unit)
  created = items.created_at[candidate]
  if hours is None:
    age = gap = np.zeros(len(user))
  else:
    age = np.nan_to_num((ctx.last_time[user] - created) * hours)
    gap = np.nan_to_num((items.created_at[last] - created) * hours)
  similarity = np.einsum("nd,nd->n", unit_embeddings[candidate], unit_embeddings[last])
  same = (items.category[candidate] == items.category[last]) & (items.category[candidate] > 0)
  columns = {
      "recall_score": recall_score,
      "recall_rank": recall_rank,
      "user_click_count": ctx.click_count[user],
      "user_unique_items": ctx.unique_items[user],
      "item_click_count": items.train_clicks[candidate],
      "words_count": items.words_count[candidate],
      "item_age_hours": age,
      "time_gap_hours": gap,
      "emb_sim_last": np.where(last > 0, similarity, 0.0),
      "is_same_category": same,
      "transitions_from_last": np.where(last > 0, items.transitions(last, candidate), 0.0),
  }
  return np.stack([np.asarray(columns[name], np.float32) for name in mf.DENSE_FEATURES], axis=1)


def _position_in_group(sorted_groups: np.ndarray) -> np.ndarray:
  """0-based position of each element within its run of equal values."""
  run_start = np.flatnonzero(np.concatenate([[True], sorted_groups[1:] != sorted_groups[:-1]]))
  return np.arange(len(sorted_groups)) - np.repeat(
      run_start, np.diff(np.append(run_start, len(sorted_groups))))


def cap_negatives(user: np.ndarray, label: np.ndarray, rank: np.ndarray, cap: int,
                  policy: str, rng: np.random.Generator) -> np.ndarray:
  """Row mask: every positive, and at most `cap` negatives per user (0: all).

  random: uniform; top: the best-ranked by retrieval (the hard ones that
  decide the top of a reranked list); mixed: the best-ranked cap // 2 and
  random ones for the rest.
  """
  if cap == 0:
    return np.ones(len(user), bool)
  negative = np.flatnonzero(label == 0)
  key = rng.random(len(negative))
  if policy != "random":
    by_rank = negative[np.lexsort((rank[negative], user[negative]))]
    best = np.empty(len(negative), np.int64)
    best[np.searchsorted(negative, by_rank)] = _position_in_group(user[by_rank])
    hard = cap if policy == "top" else cap // 2
    key = np.where(best < hard, best - hard, key)  # the hard ones sort first
  order = negative[np.lexsort((key, user[negative]))]
  keep = label != 0
  keep[order[_position_in_group(user[order]) < cap]] = True
  return keep


@dataclasses.dataclass
class SplitRows:
  """The examples of one split, row-aligned."""
  user: np.ndarray
  candidate: np.ndarray
  label: np.ndarray
  dense: np.ndarray
  ctx: UserContext

  def take(self, rows: np.ndarray) -> "SplitRows":
    return SplitRows(self.user[rows], self.candidate[rows], self.label[rows], self.dense[rows],
                     self.ctx)


def split_rows(cands: Candidates, ctx: UserContext, items: ItemFeatures,
               embeddings: np.ndarray, time_unit: str) -> SplitRows:
  dense = dense_features(ctx, items, embeddings, time_unit, cands.user, cands.item,
                         cands.score, cands.rank)
  label = (cands.item == ctx.target[cands.user]).astype(np.int64)
  return SplitRows(cands.user, cands.item, label, dense, ctx)


def _write_split(out_dir: Path, name: str, rows: SplitRows, item_category: np.ndarray,
                 config: RankingConfig) -> mf.SplitInfo:
  (out_dir / name).mkdir()
  num_shards = max(1, min(config.num_shards, len(rows.user)))
  q = rows.ctx.queries
  shards = []
  for shard, part in enumerate(np.array_split(np.arange(len(rows.user)), num_shards)):
    relative = mf.shard_file_name(name, shard, num_shards, config.compression)
    with TFRecordFileWriter(out_dir / relative, config.compression) as writer:
      for begin in range(0, len(part), config.examples_per_chunk):
        chunk = part[begin:begin + config.examples_per_chunk]
        user = rows.user[chunk]
        history, _ = sq.pad_left_ragged(q.values, q.offsets[user - 1], q.offsets[user],
                                        config.max_hist_len)
        writer.write_examples({
            mf.FEATURE_USER: user,
            mf.FEATURE_HISTORY: history,
            mf.FEATURE_CANDIDATE: rows.candidate[chunk],
            mf.FEATURE_CANDIDATE_CATEGORY: item_category[rows.candidate[chunk]],
            mf.FEATURE_LABEL: rows.label[chunk],
            mf.FEATURE_DENSE: rows.dense[chunk],
        })
      sha = writer.close()
    shards.append(mf.ShardInfo(relative, len(part), writer.bytes_written, sha))
    logging.info("%s: shard %d/%d written (%d examples)", name, shard + 1, num_shards, len(part))
  return mf.SplitInfo(len(rows.user), tuple(shards))


def run(config: RankingConfig) -> mf.RankingManifest:
  """Builds the ranking data directory; returns its manifest."""
  config.validate()
  started = time.perf_counter()
  output_dir = Path(config.output_dir)
  inputs = tuple(p for p in (config.data_dir, *config.candidates, config.item_embeddings) if p)
  replaceable = dict(overwrite=config.overwrite, own_file=mf.MANIFEST_FILE, inputs=inputs)
  check_replaceable(output_dir, **replaceable)
  with locked_output(output_dir, "preprocess --mode=ranking"):
    return _run_locked(config, output_dir, replaceable, started)


def _run_locked(config: RankingConfig, output_dir: Path, replaceable: dict,
                started: float) -> mf.RankingManifest:
  manifest = mf.load(config.data_dir)
  item_vocab = Vocabulary.from_parquet(manifest.path(mf.ITEMS_FILE), "item_id")
  user_vocab = Vocabulary.from_parquet(manifest.path(mf.USERS_FILE), "user_id")
  by_split: dict[str, Candidates] = {}
  for directory in config.candidates:
    cands = read_candidates(directory, manifest, item_vocab, user_vocab)
    if cands.split in by_split:
      raise ConfigError(f"--candidates: {by_split[cands.split].directory} and {directory} are "
                        f"both lists for the {cands.split} click")
    by_split[cands.split] = cands
  train_split, eval_split = (mf.VALID, mf.TEST) if manifest.holdout == "valid_test" \
      else (mf.VALID, mf.VALID)
  for needed in {train_split, eval_split}:
    if needed not in by_split:
      raise ConfigError(f"--candidates: no retrieval output made with --eval_split={needed} "
                        f"(have {', '.join(sorted(by_split)) or 'none'}); --holdout="
                        f"{manifest.holdout} data needs {train_split} lists for training and "
                        f"{eval_split} lists for evaluation")
  models = {c.job.get("item_embeddings_sha256") for c in by_split.values()}
  if len(models) > 1:
    raise ConfigError("--candidates: the retrieval outputs come from different models")
  embeddings_source = config.item_embeddings or by_split[train_split].job.get("model_dir", "")
  embeddings, embeddings_path = load_item_embeddings(embeddings_source, manifest)
  logging.info("read %s candidates in %.1fs", " + ".join(
      f"{len(c.user)} {s}" for s, c in by_split.items()), time.perf_counter() - started)

  table = pq.read_table(manifest.path(mf.USER_HISTORIES_FILE))
  items = ItemFeatures.read(manifest, table)
  time_unit = manifest.source.get("time_unit", "order")
  rng = np.random.default_rng(config.seed)
  train_rows = split_rows(by_split[train_split], user_context(table, train_split), items,
                          embeddings, time_unit)
  if eval_split == train_split:  # holdout=last: users 80/20
    users = np.unique(train_rows.user)
    eval_users = rng.permutation(users)[:max(1, int(round(len(users) *
                                                          config.eval_users_fraction)))]
    is_eval = np.isin(train_rows.user, eval_users)
    eval_rows = train_rows.take(np.flatnonzero(is_eval))
    train_rows = train_rows.take(np.flatnonzero(~is_eval))
  else:
    eval_rows = split_rows(by_split[eval_split], user_context(table, eval_split), items,
                           embeddings, time_unit)
  rank_column = mf.DENSE_FEATURES.index("recall_rank")
  train_rows = train_rows.take(np.flatnonzero(cap_negatives(
      train_rows.user, train_rows.label, train_rows.dense[:, rank_column],
      config.negatives_per_user, config.negative_sampling, rng)))
  if not train_rows.label.any():
    raise DataError(f"--candidates={by_split[train_split].directory}: no positives at all in "
                    f"the training split (no {train_split} click is among its candidates); "
                    "retrieve more candidates (--topk) or with a better model")
  train_rows = train_rows.take(rng.permutation(len(train_rows.user)))
  # By user, then retrieval rank: the order the reranked lists are compared with.
  eval_rows = eval_rows.take(np.lexsort((eval_rows.dense[:, rank_column], eval_rows.user)))
  log1p = tuple(name in mf.LOG1P_FEATURES for name in mf.DENSE_FEATURES)
  model_input = mf.dense_model_input(train_rows.dense, log1p)
  mean, var = model_input.mean(axis=0), model_input.var(axis=0)

  category = items.category.astype(np.int64)
  with output_errors(output_dir), atomic_directory(output_dir, **replaceable) as tmp:
    (tmp / "vocab").mkdir()
    for relative in (mf.ITEMS_FILE, mf.USERS_FILE):
      shutil.copyfile(manifest.path(relative), tmp / relative)
    np.save(tmp / mf.RANKING_ITEM_VECTORS_FILE, embeddings)
    splits = {mf.RANK_TRAIN: _write_split(tmp, mf.RANK_TRAIN, train_rows, category, config),
              mf.RANK_EVAL: _write_split(tmp, mf.RANK_EVAL, eval_rows, category, config)}
    counts = {}
    for name, rows in (("train", train_rows), ("eval", eval_rows)):
      counts.update({f"examples_{name}": len(rows.user), f"positives_{name}": int(rows.label.sum()),
                     f"users_{name}": len(np.unique(rows.user))})
    ranking = mf.RankingManifest(
        source={"data_dir": str(manifest.data_dir),
                "data_fingerprint": data_fingerprint(manifest),
                "candidates": {s: str(c.directory) for s, c in by_split.items()},
                "item_embeddings": str(embeddings_path.absolute()),
                "item_embeddings_sha256": sha256_file(embeddings_path), "time_unit": time_unit},
        flags=config.to_dict(), max_hist_len=config.max_hist_len, holdout=manifest.holdout,
        eval_split=eval_split, compression=config.compression,
        dense_features=mf.DENSE_FEATURES, dense_mean=tuple(float(x) for x in mean),
        dense_var=tuple(float(x) for x in var), dense_log1p=log1p, counts=counts,
        vocab_sizes=dict(manifest.vocab_sizes), splits=splits)
    mf.write(ranking, tmp)
  logging.info("wrote %s in %.1fs: %s", output_dir, time.perf_counter() - started, counts)
  return mf.load_ranking(output_dir)
