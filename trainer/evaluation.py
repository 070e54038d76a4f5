"""Leave-one-out evaluation of a retrieval model on a manifest split.

Protocol (contracts/metrics.py states it): each user of the split has one
held-out target; the query is the user's history up to it (preprocess/
histories.py); every item except padding is scored, items in the history
are removed, and the target's rank (ties by lower index) gives HitRate@K,
NDCG@K, Recall@K. With `negatives=N` the target is ranked among N distinct
random items the user has not seen (the sampled protocol of the SASRec
paper) instead of all items.

Ranks are computed inside TensorFlow a batch of users at a time, so no
users x items matrix ever reaches Python; only one rank per user does.
"""

import numpy as np
import tensorflow as tf

from contracts import histories
from contracts import manifest as mf
from contracts.sequences import csr_take_rows
from contracts import metrics
from trainer.models import RetrievalModel


def target_ranks(scores: tf.Tensor, targets: tf.Tensor) -> tf.Tensor:
  """0-based rank of each row's target (ties by lower index); removed targets rank V.

  The TF twin of contracts.metrics.target_ranks (tests check they agree).
  """
  num_items = tf.shape(scores)[1]
  target_scores = tf.gather(scores, targets, batch_dims=1)[:, None]
  columns = tf.range(num_items)[None, :]
  ahead = tf.reduce_sum(tf.cast(scores > target_scores, tf.int32), axis=1)
  tied = tf.reduce_sum(tf.cast((scores == target_scores) & (columns < targets[:, None]),
                               tf.int32), axis=1)
  return tf.where(tf.math.is_inf(target_scores[:, 0]), num_items, ahead + tied)


class Evaluator:
  """Evaluates a model on one split; holds the split's queries."""

  def __init__(self, manifest: mf.Manifest, split: str, ks=(10, 20, 50), negatives: int = 0,
               batch_size: int = 512, max_users: int = 0, seed: int = 0):
    queries = histories.load_queries(manifest, split)
    if max_users and max_users < len(queries):
      rows = np.sort(np.random.default_rng(seed).choice(len(queries), max_users, replace=False))
      values, offsets = csr_take_rows(queries.values, queries.offsets, rows)
      queries = histories.Queries(queries.user[rows], queries.target[rows], values, offsets)
    self.split, self.ks, self.negatives, self.seed = split, tuple(ks), negatives, seed
    self.max_users = max_users
    self.batch_size = batch_size
    self.queries = queries
    self.history = queries.last_items(manifest.max_seq_len)[0]
    self.num_items = manifest.vocab_sizes["items"]

  def evaluate(self, model: RetrievalModel, reranked_dir=None) -> dict:
    del reranked_dir  # the ranking evaluator's; retrieval lists are the retrieval job's
    item_vectors = _all_item_vectors(model, self.num_items)
    rank_fn = self._rank_function(model)
    q = self.queries
    ranks = []
    for begin in range(0, len(q), self.batch_size):
      end = min(begin + self.batch_size, len(q))
      seen_start, seen_end = q.offsets[begin], q.offsets[end]
      seen_rows = np.repeat(np.arange(end - begin), np.diff(q.offsets[begin:end + 1]))
      ranks.append(rank_fn(
          tf.constant(self.history[begin:end], tf.int32),
          tf.constant(q.user[begin:end], tf.int32),
          tf.constant(q.target[begin:end], tf.int32),
          tf.constant(seen_rows, tf.int32),
          tf.constant(q.values[seen_start:seen_end], tf.int32),
          item_vectors,
          tf.constant([self.seed, begin], tf.int64)).numpy())
    ranks = np.concatenate(ranks) if ranks else np.zeros(0, np.int64)
    result = metrics.summarize(ranks, self.ks)
    result.update(split=self.split, protocol=f"sampled_{self.negatives}" if self.negatives
                  else "full", num_items=self.num_items - 1,
                  targets_already_seen=int(_targets_seen(q)))
    return result

  def headline(self, result: dict) -> str:
    k = min(self.ks)
    return (f"{result['split']} HR@{k} {result[f'hit_rate@{k}']:.4f} "
            f"NDCG@{k} {result[f'ndcg@{k}']:.4f} ({result['protocol']} ranking, "
            f"{result['num_users']} users)")

  def _rank_function(self, model: RetrievalModel):
    negatives = self.negatives

    @tf.function(reduce_retracing=True)
    def ranks(history, user, target, seen_rows, seen_cols, item_vectors, seed):
      query = model.user_vector(history, user)
      scores = tf.matmul(query, item_vectors, transpose_b=True)
      removed = tf.scatter_nd(tf.stack([seen_rows, seen_cols], axis=1),
                              tf.ones_like(seen_rows, tf.bool), tf.shape(scores))
      removed |= tf.equal(tf.range(tf.shape(scores)[1]), 0)[None, :]  # padding
      scores = tf.where(removed, tf.constant(-np.inf, scores.dtype), scores)
      if not negatives:
        return target_ranks(scores, target)
      # N distinct random unseen items per user: the N smallest random keys,
      # with seen items, padding and the target pushed out of reach.
      keys = tf.random.stateless_uniform(tf.shape(scores), seed=seed)
      is_target = tf.equal(tf.range(tf.shape(scores)[1])[None, :], target[:, None])
      keys = tf.where(removed | is_target, 2.0, keys)
      _, sampled = tf.math.top_k(-keys, k=negatives)
      candidates = tf.concat([target[:, None], sampled], axis=1)
      candidate_scores = tf.gather(scores, candidates, batch_dims=1)
      # The target is column 0; rank it among the sampled items by score, ties
      # by item index as in the full protocol.
      order_key = tf.where(tf.range(negatives + 1)[None, :] == 0, target[:, None], candidates)
      return _rank_first(candidate_scores, order_key)

    return ranks


def _rank_first(scores: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
  """Rank of column 0 among the columns (ties by lower `index`)."""
  first = scores[:, :1]
  ahead = tf.reduce_sum(tf.cast(scores[:, 1:] > first, tf.int32), axis=1)
  tied = tf.reduce_sum(tf.cast((scores[:, 1:] == first) & (index[:, 1:] < index[:, :1]),
                               tf.int32), axis=1)
  return tf.where(tf.math.is_inf(first[:, 0]), tf.shape(scores)[1], ahead + tied)


def _all_item_vectors(model: RetrievalModel, num_items: int, chunk: int = 65536) -> tf.Tensor:
  parts = [model.item_vectors(tf.range(b, min(b + chunk, num_items)), training=False)
           for b in range(0, num_items, chunk)]
  return tf.concat(parts, axis=0)


def _targets_seen(q: histories.Queries) -> int:
  rows = np.repeat(np.arange(len(q)), np.diff(q.offsets))
  return len(np.unique(rows[q.values == q.target[rows]]))
