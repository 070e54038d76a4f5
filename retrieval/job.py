"""The retrieval job: index the item tower, export top-K candidates per user, evaluate.

  output_dir/
    job.json                       the settings every worker and re-run must share
    index/items.faiss              FAISS index (IndexIDMap2; labels = raw item ids, or the item
                                   indices of vocab/items.parquet when the ids are strings)
    index/index_info.json          what was built, from which export
    index/labels.parquet           string ids only: label (int64) -> item_id (raw string)
    candidates/part-WWWWW-of-NNNNN-BBBBBB.parquet
                                   user_id, item_id (raw ids, int64 or string as in the
                                   data's vocabularies), recall_score (float32),
                                   recall_rank (1-based); one file per batch of users
    _SUCCESS-WWWWW-of-NNNNN.json   worker W finished: its counts and metric sums
    _SUCCESS, metrics.json         written once every worker has finished

Concurrency: claiming the output (retrieval/output.py: which entries are
the job's own, refusing any other directory, --overwrite) leaves every
worker of a job holding output_dir/.lock shared for its run; it also holds
its own share's lock (.lock-part-WWWWW-of-NNNNN) exclusively, so one share
never runs twice at once. Of jobs with other flags started together one
wins, the others refuse, naming the running one. The first worker builds
the index under .lock-index; the others wait for it and load it.

Users are the rows of user_histories.parquet; worker W of N takes the
contiguous slice [n W / N, n (W + 1) / N) and cuts it into batches, so part
names are a function of the flags and a re-run skips every part that exists
(parts are renamed into place complete). Each part carries its own metric
sums in its Parquet metadata, so a resumed job reports the same metrics as
an uninterrupted one.

Queries (contracts/histories.py): with `eval_split=valid` each user's query
is the training history (the notebooks' export), with `test` the training
history plus the validation click, with `none` every click (serving). The
seen items removed are the whole query history, not only its last
max_seq_len clicks. Metrics are computed on the exported lists, for users
with a target in the split: HitRate/NDCG/Recall@K for K <= topk, and for ANN
indexes the overlap of the top-K with an exact search for a sample of users
(ANN recall), plus search queries per second.
"""

import dataclasses
import json
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from absl import logging

from contracts import histories
from contracts import locks
from contracts import manifest as mf
from contracts import metrics
from contracts.candidates import (CANDIDATES_DIR, CANDIDATES_VERSION, INDEX_DIR, ITEM_COLUMN,
                                  JOB_FILE, LABELS_FILE, METRICS_FILE, SUCCESS_FILE, VERSION_KEY,
                                  candidate_schema)
from contracts.errors import ConfigError, DataError
from contracts.export_manifest import EXPORT_DIR, ExportInfo
from contracts.fileio import sha256_file, write_json_atomic, write_parquet_atomic
from contracts.vocab import Vocabulary
from retrieval import index as index_lib
from retrieval import output as output_lib
from retrieval import search as search_lib
from retrieval import user_tower as tower_lib

STATS_KEY = b"retrieval_stats"
EVAL_NONE = "none"
# --eval_topk's default: those of these cut-offs that are <= --topk (--topk itself when none is).
DEFAULT_EVAL_TOPK = (10, 20, 50)
# FAISS HNSW needs 2 neighbours per node or more (0 aborts, 1 crashes); past a
# few hundred the graph costs memory (8 M bytes per item at level 0) for nothing.
HNSW_M_RANGE = (2, 512)
# Settings of one index kind whose default is 0 (auto): set for another kind, refused.
INDEX_ONLY_FLAGS = {"nlist": ("ivf", "ivf_pq"), "nprobe": ("ivf", "ivf_pq"), "ef_search": ("hnsw",)}


def default_eval_topk(topk: int) -> tuple[int, ...]:
  return tuple(k for k in DEFAULT_EVAL_TOPK if k <= topk) or (topk,)


@dataclasses.dataclass(frozen=True)
class RetrievalConfig:
  data_dir: str
  model_dir: str
  output_dir: str
  index: str = "flat"
  nlist: int = 0
  nprobe: int = 0
  pq_m: int = 8
  hnsw_m: int = 32
  ef_search: int = 0
  topk: int = 100
  batch_size: int = 8192
  exclude_seen: bool = True
  eval_split: str = mf.VALID
  eval_topk: tuple[int, ...] = ()  # (): default_eval_topk(topk)
  ann_recall_users: int = 2000
  num_workers: int = 1
  worker_index: int = 0
  threads: int = 0
  overwrite: bool = False

  # Fields every worker and every re-run must agree on (they decide the output).
  SHARED = ("index", "nlist", "nprobe", "pq_m", "hnsw_m", "ef_search", "topk", "batch_size",
            "exclude_seen", "eval_split", "eval_topk", "ann_recall_users", "num_workers")

  def __post_init__(self):
    if not self.eval_topk:
      object.__setattr__(self, "eval_topk", default_eval_topk(self.topk))

  def validate(self) -> None:
    if self.index not in index_lib.INDEX_TYPES:
      raise ConfigError(f"--index={self.index}: expected one of {', '.join(index_lib.INDEX_TYPES)}")
    for name in ("topk", "batch_size", "num_workers"):
      if getattr(self, name) < 1:
        raise ConfigError(f"--{name}={getattr(self, name)}: must be >= 1")
    for name in ("nlist", "nprobe", "ef_search", "threads", "ann_recall_users"):
      if getattr(self, name) < 0:
        raise ConfigError(f"--{name}={getattr(self, name)}: must be >= 0")
    # A setting another index kind reads would be ignored silently.
    for name, kinds in INDEX_ONLY_FLAGS.items():
      if getattr(self, name) and self.index not in kinds:
        raise ConfigError(f"--{name}={getattr(self, name)} applies to --index="
                          f"{' or '.join(kinds)}, not --index={self.index}")
    if self.pq_m < 1:
      raise ConfigError(f"--pq_m={self.pq_m}: must be >= 1 (and divide the embedding size)")
    low, high = HNSW_M_RANGE
    if not low <= self.hnsw_m <= high:
      raise ConfigError(f"--hnsw_m={self.hnsw_m}: must be in {low}..{high} (neighbours per "
                        "node; 16 to 64 is usual)")
    if not 0 <= self.worker_index < self.num_workers:
      raise ConfigError(f"--worker_index={self.worker_index} is out of range for "
                        f"--num_workers={self.num_workers}")
    if not self.eval_topk or min(self.eval_topk) < 1 or max(self.eval_topk) > self.topk:
      raise ConfigError(f"--eval_topk={','.join(map(str, self.eval_topk))}: each K must be in "
                        f"1..--topk ({self.topk})")

  def shared(self) -> dict:
    d = dataclasses.asdict(self)
    return {k: (list(d[k]) if isinstance(d[k], tuple) else d[k]) for k in self.SHARED}


@dataclasses.dataclass
class Plan:
  """Everything checked before work starts."""
  manifest: mf.Manifest
  info: ExportInfo
  query_split: str
  num_users: int
  spec: index_lib.IndexSpec


def plan(config: RetrievalConfig) -> Plan:
  """Validates flags against the data and the model; raises DataError / ConfigError."""
  config.validate()
  manifest = mf.load(config.data_dir)
  if config.eval_split != EVAL_NONE and config.eval_split not in manifest.eval_splits:
    raise ConfigError(f"--eval_split={config.eval_split}: the data ({manifest.holdout} holdout) "
                      f"has {', '.join(manifest.eval_splits)} (or 'none' for serving queries)")
  info = tower_lib.check_export_matches_data(Path(config.model_dir), manifest)
  num_items = info.num_items - 1
  if config.topk > num_items:
    raise ConfigError(f"--topk={config.topk} is larger than the item count ({num_items})")
  spec = index_lib.IndexSpec(kind=config.index, nlist=config.nlist, pq_m=config.pq_m,
                             hnsw_m=config.hnsw_m)
  try:
    spec = spec.resolved(num_items, info.emb_dim)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  if config.nprobe and spec.kind in ("ivf", "ivf_pq") and config.nprobe > spec.nlist:
    raise ConfigError(f"--nprobe={config.nprobe} is larger than nlist ({spec.nlist})")
  query_split = histories.ALL if config.eval_split == EVAL_NONE else config.eval_split
  return Plan(manifest, info, query_split, histories.num_users(manifest), spec)


def share_range(num_users: int, worker: int, num_workers: int) -> tuple[int, int]:
  """Share `worker` of `num_workers`: users [n W / N, n (W + 1) / N)."""
  return num_users * worker // num_workers, num_users * (worker + 1) // num_workers


def run(config: RetrievalConfig) -> dict:
  """Runs this worker's share; returns the job metrics once every worker is done, else {}."""
  with open_job(config) as opened:
    runner = ShareRunner(config, opened)
    search_params = runner.run_share(config.worker_index)
    return finish_if_complete(opened.out, config, opened.plan, search_params)


@dataclasses.dataclass
class OpenedJob:
  """A job whose output this process has claimed (job.json matches; OUT/.lock held shared)."""
  plan: Plan
  out: Path
  model: dict
  lock: locks.LockFile

  def __enter__(self) -> "OpenedJob":
    return self

  def __exit__(self, *exc) -> None:
    self.lock.close()


def preflight(config: RetrievalConfig) -> Plan:
  """Every check that needs no lock, creating nothing: the flags against the
  data and the model, and --output_dir (holds no input; absent, empty or a
  retrieval output)."""
  p = plan(config)
  output_lib.check_output_dir(Path(config.output_dir),
                              inputs=(config.data_dir, config.model_dir))
  return p


def open_job(config: RetrievalConfig) -> OpenedJob:
  """Validates the flags and claims the output for the life of the returned job."""
  p = preflight(config)
  out = Path(config.output_dir)
  model = _model_identity(config, p)
  stamp = {VERSION_KEY: CANDIDATES_VERSION, **config.shared(), **model,
           "spec": dataclasses.asdict(p.spec)}
  return OpenedJob(p, out, model, output_lib.claim(out, stamp, config.overwrite))


class ShareRunner:
  """What every share searches with, loaded once (the index, the user tower,
  the vocabularies), and `run_share` for any share of the job."""

  def __init__(self, config: RetrievalConfig, opened: OpenedJob):
    if config.threads:
      faiss.omp_set_num_threads(config.threads)
    self.config, self.p, self.out = config, opened.plan, opened.out
    self.items = Vocabulary.from_parquet(self.p.manifest.path(mf.ITEMS_FILE), "item_id")
    self.users = Vocabulary.from_parquet(self.p.manifest.path(mf.USERS_FILE), "user_id")
    self.index, self.exact, self.dense = _index(config, self.p, self.out, self.items,
                                                opened.model)
    self.search_params = index_lib.set_search_params(self.index, config.nprobe,
                                                     config.ef_search, config.topk)
    self.tower = tower_lib.UserTower(Path(config.model_dir), self.p.info)
    # Every `stride`-th user (global position) is also searched exactly.
    self.stride = max(1, self.p.num_users // config.ann_recall_users) \
        if self.exact is not None and config.ann_recall_users else 0

  def run_share(self, worker: int) -> dict:
    """Writes share `worker`'s missing parts and its success marker, holding
    the share's lock; returns the search parameters."""
    config = self.config
    share = f"{output_lib.SHARE_LOCK_PREFIX}{output_lib.part_prefix(worker, config.num_workers)}"
    with locks.exclusive_file(self.out / share, f"retrieval worker {worker} of "
                              f"{config.num_workers} of this job", self.out):
      self._run_locked(worker)
    return self.search_params

  def write_part(self, path: Path, queries, result, stats) -> None:
    _write_part(path, queries, result, self.users, self.items, stats)

  def _run_locked(self, worker: int) -> None:
    config, p, out = self.config, self.p, self.out
    begin, end = share_range(p.num_users, worker, config.num_workers)
    prefix = output_lib.part_prefix(worker, config.num_workers)
    (out / CANDIDATES_DIR).mkdir(exist_ok=True)
    # Temporaries of parts a killed run of this share was writing.
    for stale in (out / CANDIDATES_DIR).glob(f".{prefix}-*.tmp-*"):
      stale.unlink(missing_ok=True)
    totals: list[dict] = []
    started, done_users, skipped = time.perf_counter(), 0, 0
    batches = histories.iter_query_batches(p.manifest, p.query_split, begin, end,
                                           config.batch_size)
    num_batches = -(-(end - begin) // config.batch_size)
    logging.info("worker %d/%d: users %d..%d in %d batches of %d, index %s %s", worker,
                 config.num_workers, begin, end, num_batches, config.batch_size, p.spec.kind,
                 self.search_params)
    for b, queries in enumerate(batches):
      path = out / CANDIDATES_DIR / output_lib.part_name(worker, config.num_workers, b)
      if path.exists():
        totals.append(_read_stats(path))
        skipped += 1
        continue
      stats = _candidates_for_batch(queries, begin + b * config.batch_size, self, path)
      totals.append(stats)
      done_users += len(queries)
      elapsed = time.perf_counter() - started
      logging.info("batch %d/%d: %d users, %.0f users/s end to end, %.0f queries/s search%s",
                   b + 1, num_batches, len(queries), done_users / elapsed,
                   stats["users"] / max(stats["search_seconds"], 1e-9),
                   f" ({stats['researched_rows']} rows re-searched)"
                   if stats["researched_rows"] else "")
    if skipped:
      logging.info("%d of %d parts were already written (resumed)", skipped, num_batches)
    summary = metrics.merge_sums(totals)
    write_json_atomic(out / output_lib.success_name(worker, config.num_workers),
                      {"worker": worker, "num_workers": config.num_workers,
                       "parts": num_batches, **summary})


def _candidates_for_batch(queries, first: int, runner: ShareRunner, path: Path) -> dict:
  config, p, index, exact, dense = runner.config, runner.p, runner.index, runner.exact, runner.dense
  stride, items, tower = runner.stride, runner.items, runner.tower
  t0 = time.perf_counter()
  history = queries.last_items(p.manifest.max_seq_len)[0]
  vectors = np.ascontiguousarray(tower(history, queries.user), dtype=np.float32)
  faiss.normalize_L2(vectors)
  t1 = time.perf_counter()
  if dense is not None:
    result = search_lib.search_unseen_dense(dense, vectors, queries.values, queries.offsets,
                                            config.topk, config.exclude_seen)
  else:
    result = search_lib.search_unseen(index, items, vectors, queries.values,
                                       queries.offsets, config.topk, config.exclude_seen)
  search_seconds = time.perf_counter() - t1
  stats = {"users": len(queries), "rows": int(result.counts.sum()),
           "search_seconds": search_seconds, "tower_seconds": t1 - t0,
           "researched_rows": result.researched_rows,
           "short_rows": int((result.counts < config.topk).sum())}
  if p.query_split != histories.ALL:
    has_target = np.flatnonzero(queries.target > 0)
    ranks = metrics.ranks_in_lists(result.items[has_target], queries.target[has_target])
    stats.update(metrics.rank_sums(ranks, config.eval_topk))
  if stride:
    rows = np.flatnonzero((first + np.arange(len(queries))) % stride == 0)
    if len(rows):
      sample = queries.take(rows)
      reference = search_lib.search_unseen(exact, items, vectors[rows], sample.values,
                                           sample.offsets, config.topk, config.exclude_seen)
      stats["ann_users"] = len(rows)
      stats["ann_overlap_sum"] = float(_overlap(result.items[rows], reference.items,
                                                reference.counts).sum())
  stats["seconds"] = time.perf_counter() - t0
  runner.write_part(path, queries, result, stats)
  return stats


def _overlap(found: np.ndarray, reference: np.ndarray, reference_counts: np.ndarray) -> np.ndarray:
  """|found_i ∩ reference_i| / |reference_i| per row (0 entries are padding)."""
  rows = np.arange(len(found))[:, None]
  ref = np.sort(search_lib.row_keys(rows, reference)[reference > 0])
  hit = search_lib.isin_sorted(search_lib.row_keys(rows, found), ref) & (found > 0)
  return hit.sum(axis=1) / np.maximum(reference_counts, 1)


def _write_part(path: Path, queries, result, users, items, stats) -> None:
  topk = result.items.shape[1]
  mask = np.arange(topk)[None, :] < result.counts[:, None]
  row = np.repeat(np.arange(len(queries)), result.counts)
  schema = candidate_schema(users.arrow_type, items.arrow_type)
  table = pa.table({
      "user_id": users.to_arrow(queries.user[row]),
      ITEM_COLUMN: items.to_arrow(result.items[mask]),
      "recall_score": pa.array(result.scores[mask], pa.float32()),
      "recall_rank": pa.array(np.nonzero(mask)[1].astype(np.int32) + 1, pa.int32()),
  }, schema=schema.with_metadata({STATS_KEY: json.dumps(stats).encode()}))
  write_parquet_atomic(path, table)  # one batch: bounded, and renamed into place whole


def _read_stats(path: Path) -> dict:
  try:
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta[STATS_KEY])
  except (OSError, KeyError, ValueError) as e:
    raise DataError(f"{path}: not a candidate part of this job ({e}); delete it to redo it") from e


def _index(config: RetrievalConfig, p: Plan, out: Path, items: Vocabulary, model: dict):
  """The job's index (loaded when a previous run or another worker saved it);
  for ANN kinds an exact Flat index for the recall measurement, for small
  Flat catalogues the normalised vectors for the dense exact search."""
  vectors = tower_lib.load_item_embeddings(Path(config.model_dir), p.info)[1:]
  info = {"spec": dataclasses.asdict(p.spec), **model,
          "num_items": len(vectors), "dim": int(vectors.shape[1]),
          "labels": "item index" if items.is_string else "raw item_id",
          "metric": "inner product of L2-normalised vectors"}
  directory = out / INDEX_DIR
  # One worker builds, the others wait and load it: every share searches the same index.
  index_lock = locks.LockFile(out / output_lib.INDEX_LOCK, "retrieval worker", out)
  try:
    index_lock.wait()
    if (directory / index_lib.INDEX_INFO_FILE).exists():
      index, saved = index_lib.load(directory)
      if saved != info:
        raise DataError(f"{directory}: holds an index built differently; pass --overwrite")
      logging.info("loaded the index from %s", directory)
    else:
      started = time.perf_counter()
      index, _ = index_lib.build(vectors, items.faiss_labels(), p.spec)
      index_lib.save(index, directory, info)
      if items.is_string:  # the labels are item indices: their raw ids beside the index
        write_parquet_atomic(directory / LABELS_FILE, pa.table({
            "label": pa.array(items.faiss_labels()),
            "item_id": items.to_arrow(items.faiss_labels())}))
      logging.info("built %s index over %d items in %.1fs", p.spec.kind, len(vectors),
                   time.perf_counter() - started)
  finally:
    index_lock.close()
  exact = dense = None
  if p.spec.kind != "flat":
    exact, _ = index_lib.build(vectors, items.faiss_labels(), index_lib.IndexSpec("flat"))
  elif len(vectors) <= search_lib.DENSE_MAX_ITEMS:
    # Exact search of a small catalogue: the same vectors the index holds.
    dense = np.ascontiguousarray(vectors, dtype=np.float32).copy()
    faiss.normalize_L2(dense)
  return index, exact, dense


def _model_identity(config: RetrievalConfig, p: Plan) -> dict:
  """Which export this is: a retrained model at the same step has other item vectors."""
  embeddings = Path(config.model_dir) / EXPORT_DIR / p.info.item_embeddings
  return {"model_dir": str(Path(config.model_dir).absolute()), "global_step": p.info.global_step,
          "data_fingerprint": p.info.data_fingerprint,
          "vocab_fingerprints": p.info.vocab_fingerprints,
          "item_embeddings_sha256": sha256_file(embeddings)}


def finish_if_complete(out: Path, config: RetrievalConfig, p: Plan, search_params: dict) -> dict:
  """The job's metrics, _SUCCESS and metrics.json once every share's marker is there; else {}."""
  markers = [out / output_lib.success_name(w, config.num_workers)
             for w in range(config.num_workers)]
  if not all(m.exists() for m in markers):
    logging.info("worker %d done; waiting for the other workers' markers", config.worker_index)
    return {}
  sums = metrics.merge_sums(json.loads(m.read_text()) for m in markers)
  result = {
      "split": config.eval_split, "index": p.spec.kind, **search_params,
      "topk": config.topk, "exclude_seen": config.exclude_seen,
      "users": int(sums["users"]), "candidates": int(sums["rows"]),
      "users_short_of_topk": int(sums["short_rows"]),
      "queries_per_s": sums["users"] / max(sums["search_seconds"], 1e-9),
      "users_per_s": sums["users"] / max(sums["seconds"], 1e-9),
  }
  if config.eval_split != EVAL_NONE:
    result.update(metrics.summarize_sums(sums, config.eval_topk))
  if sums.get("ann_users"):
    result[f"ann_recall@{config.topk}"] = sums["ann_overlap_sum"] / sums["ann_users"]
    result["ann_recall_users"] = int(sums["ann_users"])
  write_json_atomic(out / METRICS_FILE, result)
  write_json_atomic(out / SUCCESS_FILE, {"users": result["users"],
                                         "candidates": result["candidates"],
                                         "num_workers": config.num_workers})
  return result
