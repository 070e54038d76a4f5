"""Evaluation of the ranker on the eval split of ranking data.

Every eval example (all retrieval candidates of each evaluation user) is
scored; contracts/metrics.py computes AUC, GAUC, logloss and
HitRate/NDCG@K of the lists re-ordered by the ranker's score, next to the
same list metrics of the retrieval order (`recall_rank`) on the same users.
The final evaluation also writes the reranked lists:

  model_dir/reranked_candidates.parquet
      user_id, item_id (raw ids), rank_score (float32 click probability),
      rank (int32, 1-based position after reranking), recall_score,
      recall_rank, label; sorted by user, then rank
"""

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import tensorflow as tf
from absl import logging

from contracts import manifest as mf
from contracts import metrics
from contracts.candidates import ITEM_COLUMN
from contracts.fileio import write_parquet_atomic
from contracts.vocab import Vocabulary
from trainer import input_pipeline

RERANKED_FILE = "reranked_candidates.parquet"
_RANK_COLUMN = mf.DENSE_FEATURES.index("recall_rank")
_SCORE_COLUMN = mf.DENSE_FEATURES.index("recall_score")


class RankingEvaluator:
  """Scores the eval split with a ranker and summarises the reranked lists."""

  def __init__(self, manifest: mf.RankingManifest, ks=(5, 10), batch_size: int = 8192,
               max_users: int = 0, seed: int = 0):
    self.manifest, self.ks, self.batch_size = manifest, tuple(ks), batch_size
    self.selected = None  # bool per user index: the users a periodic eval uses
    if max_users:
      rng = np.random.default_rng(seed)
      users = manifest.vocab_sizes["users"]
      chosen = rng.choice(np.arange(1, users), min(max_users, users - 1), replace=False)
      self.selected = np.zeros(users, bool)
      self.selected[chosen] = True

  def _dataset(self) -> tf.data.Dataset:
    files = [str(p) for p in self.manifest.shard_paths(mf.RANK_EVAL)]
    dataset = tf.data.TFRecordDataset(files, compression_type=self.manifest.tfrecord_compression)
    dataset = dataset.batch(self.batch_size).map(
        lambda b: input_pipeline.parse_batch(b, self.manifest.feature_specs),
        num_parallel_calls=tf.data.AUTOTUNE)
    if self.selected is not None:
      selected = tf.constant(self.selected)

      def keep_selected(batch):
        keep = tf.gather(selected, batch[mf.FEATURE_USER])
        return {name: tf.boolean_mask(value, keep) for name, value in batch.items()}

      dataset = dataset.map(keep_selected)
    return dataset.prefetch(tf.data.AUTOTUNE)

  def predict(self, model) -> dict[str, np.ndarray]:
    """Per eval example: user, candidate, label, retrieval score/rank, logit."""

    @tf.function(reduce_retracing=True)
    def logits_of(batch):
      return model.forward(batch, training=False)[0]

    columns: dict[str, list] = {"user": [], "candidate": [], "label": [], "recall_rank": [],
                                "recall_score": [], "logit": []}
    for batch in self._dataset():
      columns["logit"].append(logits_of(batch).numpy())
      columns["user"].append(batch[mf.FEATURE_USER].numpy())
      columns["candidate"].append(batch[mf.FEATURE_CANDIDATE].numpy())
      columns["label"].append(batch[mf.FEATURE_LABEL].numpy())
      dense = batch[mf.FEATURE_DENSE].numpy()
      columns["recall_rank"].append(dense[:, _RANK_COLUMN])
      columns["recall_score"].append(dense[:, _SCORE_COLUMN])
    return {name: np.concatenate(parts) if parts else np.zeros(0)
            for name, parts in columns.items()}

  def evaluate(self, model, reranked_dir: Path | None = None) -> dict:
    started = time.perf_counter()
    p = self.predict(model)
    probability = 1.0 / (1.0 + np.exp(-p["logit"].astype(np.float64)))
    # recall_rank is the candidate file's 1-based position; the metrics rank from 0.
    result = metrics.summarize_reranking(p["user"], p["label"], p["logit"], probability,
                                         p["recall_rank"] - 1, self.ks)
    result.update(split=mf.RANK_EVAL, labels_from=self.manifest.eval_split,
                  eval_seconds=time.perf_counter() - started)
    if reranked_dir is not None:
      path = write_reranked(self.manifest, p, probability, reranked_dir)
      logging.info("wrote %d reranked candidates to %s", len(p["user"]), path)
    return result

  def headline(self, result: dict) -> str:
    k = min(self.ks)
    return (f"eval AUC {result['auc']:.4f} GAUC {result['gauc']:.4f} logloss "
            f"{result['logloss']:.4f}, NDCG@{k} {result[f'ndcg@{k}']:.4f} (retrieval order "
            f"{result[f'retrieval_ndcg@{k}']:.4f}), HR@{k} {result[f'hit_rate@{k}']:.4f} "
            f"(retrieval {result[f'retrieval_hit_rate@{k}']:.4f}), {result['num_users']} users")


def write_reranked(manifest: mf.RankingManifest, p: dict[str, np.ndarray],
                   probability: np.ndarray, directory: Path) -> Path:
  """The eval users' candidates in reranked order, as one Parquet file (atomic)."""
  position = metrics.rank_within_groups(p["user"], p["logit"], p["recall_rank"]) + 1
  order = np.lexsort((position, p["user"]))
  items = Vocabulary.from_parquet(manifest.path(mf.ITEMS_FILE), "item_id")
  users = Vocabulary.from_parquet(manifest.path(mf.USERS_FILE), "user_id")
  table = pa.table({
      "user_id": users.to_arrow(p["user"][order]),
      ITEM_COLUMN: items.to_arrow(p["candidate"][order]),
      "rank_score": pa.array(probability[order], pa.float32()),
      "rank": pa.array(position[order], pa.int32()),
      "recall_score": pa.array(p["recall_score"][order], pa.float32()),
      "recall_rank": pa.array(p["recall_rank"][order], pa.int32()),
      "label": pa.array(p["label"][order], pa.int8()),
  })
  path = Path(directory) / RERANKED_FILE
  write_parquet_atomic(path, table)
  return path
