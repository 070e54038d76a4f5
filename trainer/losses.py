"""Retrieval losses, one small layer each: the in-batch softmax (InfoNCE),
the softmax over the whole catalogue, and the sampled softmax over negatives
drawn from the catalogue (CatalogueSampler).

In-batch softmax: row i of `query` has candidate i as its positive. Its negatives are a pool
of the batch's other candidates: all of them (the notebooks), or with
`num_negatives=M` a random subset of M shared by all queries of the step
(for the all-position loss of windows, where the full batch would make a
positions x positions matrix), drawn uniformly with replacement from the
batch's real candidates. What the notebooks lack is behind a flag each:

* cross_replica: the pool is gathered from all replicas (`all_gather`), so
  mirrored training sees the global batch as negatives, not its slice. Each
  replica returns its share of the global mean (its rows' loss sum over the
  global weight sum), so the summed gradients equal the single-device
  gradient on the global batch.
* remove_accidental_hits: a pool entry with the same item id as row i's
  positive (the same item clicked by another user in the batch) is not a
  negative for row i.
* logq_correction: log(sampling probability) of each candidate is
  subtracted from its logit, positive included (Yi et al. 2019), because
  popular items appear as in-batch negatives more often than a softmax over
  all items assumes.
* symmetric: also the item->query direction (the notebooks' option; only
  with the full pool).

Rows with weight 0 (padding positions of a window) are neither queries nor
negatives. Logits are computed in float32 whatever the inputs' dtype (mixed
precision, trainer/precision.py); a masked logit is a large finite negative, so
rows of padding stay NaN-free.
"""

import numpy as np
import tensorflow as tf

from trainer.precision import large_negative


class InBatchSoftmaxLoss(tf.Module):

  def __init__(self, temperature: float, remove_accidental_hits: bool = True,
               logq_correction: bool = True, symmetric: bool = False,
               cross_replica: bool = False, num_negatives: int = 0, name: str | None = None):
    super().__init__(name=name)
    if symmetric and num_negatives:
      raise ValueError("the symmetric loss needs the full in-batch pool (num_negatives=0)")
    self.temperature = temperature
    self.remove_accidental_hits = remove_accidental_hits
    self.logq_correction = logq_correction
    self.symmetric = symmetric
    self.cross_replica = cross_replica
    self.num_negatives = num_negatives

  def __call__(self, query: tf.Tensor, candidate: tf.Tensor, candidate_ids: tf.Tensor,
               weights: tf.Tensor, candidate_log_q: tf.Tensor | None = None,
               seed: tf.Tensor | None = None) -> tf.Tensor:
    """Returns this replica's share of the global weighted mean loss.

    query, candidate: [n, d] (L2-normalised); candidate_ids: [n] item ids;
    weights: [n] (0 drops the row); candidate_log_q: [n] log sampling
    probability (needed with logq_correction); seed: [2] int, picks the pool
    when num_negatives > 0 (derive it from the step for exact resumes).
    """
    if self.logq_correction and candidate_log_q is None:
      raise ValueError("logq_correction needs candidate_log_q")
    query = tf.cast(query, tf.float32)
    candidate = tf.cast(candidate, tf.float32)
    weights = tf.cast(weights, tf.float32)
    log_q = tf.cast(candidate_log_q, tf.float32) if self.logq_correction else \
        tf.zeros_like(weights)
    n = tf.shape(query)[0]
    ctx = tf.distribute.get_replica_context()
    replicas = ctx.num_replicas_in_sync if ctx is not None else 1
    gather = self.cross_replica and replicas > 1
    replica_id = tf.cast(ctx.replica_id_in_sync_group, tf.int32) if gather else 0
    offset = replica_id * n  # global index of this replica's first row

    # The pool: indices of this replica's candidates that act as negatives.
    if self.num_negatives:
      # Uniform with replacement over this replica's valid candidates: draw
      # k in [0, valid) and take the (k+1)-th valid index. No sort: when the
      # loss was inside the XLA step, a TopK made the step 4x slower.
      local_pool = max(1, self.num_negatives // (replicas if gather else 1))
      seed = tf.zeros([2], tf.int64) if seed is None else tf.cast(seed, tf.int64)
      seed += tf.cast(tf.stack([0, replica_id]), tf.int64)
      valid_so_far = tf.cumsum(tf.cast(weights > 0, tf.int32))
      draws = tf.random.stateless_uniform([local_pool], seed=seed, alg="philox")
      k = tf.cast(draws * tf.cast(valid_so_far[-1], tf.float32), tf.int32)
      pool = tf.reduce_sum(tf.cast(valid_so_far[None, :] <= k[:, None], tf.int32), axis=1)
      pool = tf.minimum(pool, n - 1)  # no valid candidate at all: any index, weight 0
    else:
      pool = tf.range(n)
    pool_vectors = tf.gather(candidate, pool)
    pool_ids = tf.gather(candidate_ids, pool)
    pool_weights = tf.gather(weights, pool)
    pool_log_q = tf.gather(log_q, pool)
    pool_owner = pool + offset
    if gather:
      pool_vectors, pool_ids, pool_weights, pool_log_q, pool_owner = (
          ctx.all_gather(t, axis=0)
          for t in (pool_vectors, pool_ids, pool_weights, pool_log_q, pool_owner))

    positive = tf.reduce_sum(query * candidate, axis=1) / self.temperature - log_q
    negatives = tf.matmul(query, pool_vectors, transpose_b=True) / self.temperature
    negatives -= pool_log_q[None, :]
    rows = offset + tf.range(n)
    drop = tf.equal(pool_owner[None, :], rows[:, None])  # the positive itself
    drop |= ~(pool_weights[None, :] > 0)
    if self.remove_accidental_hits:
      drop |= tf.equal(pool_ids[None, :], candidate_ids[:, None])
    negatives = tf.where(drop, large_negative(negatives.dtype), negatives)
    logits = tf.concat([positive[:, None], negatives], axis=1)
    loss = tf.reduce_logsumexp(logits, axis=1) - positive

    if self.symmetric:
      loss = (loss + self._item_to_query(query, candidate, candidate_ids, weights, ctx, gather,
                                         rows)) / 2.0
    total = tf.reduce_sum(loss * weights)
    weight_sum = tf.reduce_sum(weights)
    if replicas > 1:
      weight_sum = ctx.all_reduce(tf.distribute.ReduceOp.SUM, weight_sum)
    return total / tf.maximum(weight_sum, 1.0)

  def _item_to_query(self, query, candidate, candidate_ids, weights, ctx, gather, rows):
    """Candidate i against every query of the (global) batch; no logQ on queries."""
    all_query, all_ids, all_weights = query, candidate_ids, weights
    if gather:
      all_query, all_ids, all_weights = (ctx.all_gather(t, axis=0)
                                         for t in (query, candidate_ids, weights))
    logits = tf.matmul(candidate, all_query, transpose_b=True) / self.temperature
    is_label = tf.equal(tf.range(tf.shape(all_query)[0])[None, :], rows[:, None])
    drop = ~(all_weights[None, :] > 0)
    if self.remove_accidental_hits:  # another query whose positive is this item
      drop |= tf.equal(all_ids[None, :], candidate_ids[:, None])
    logits = tf.where(drop & ~is_label, large_negative(logits.dtype), logits)
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=rows, logits=logits)


def _row_bucket(n: tf.Tensor) -> tf.Tensor:
  """n rounded up to one of 8 sizes per power of two (at least 64).

  The XLA-compiled softmax below compiles once per row count; the real rows
  of a batch vary from step to step, so they are padded to a bucket. That
  caps the compilations at 8 per octave of row counts and the padding at
  1/8 of the rows.
  """
  n = tf.maximum(tf.cast(n, tf.int32), 1)
  octave = tf.cast(tf.math.floor(tf.math.log(tf.cast(n, tf.float32)) / tf.math.log(2.0)),
                   tf.int32)
  step = tf.maximum(64, tf.bitwise.left_shift(1, tf.maximum(octave - 3, 0)))
  return (n + step - 1) // step * step


@tf.function(jit_compile=True)
def _weighted_catalogue_cross_entropy(query, item_vectors, targets, weights, inverse_temperature):
  """sum_i weights_i * (logsumexp_j q_i.v_j - q_i.v_target_i) / T over items j >= 1.

  XLA fuses the logsumexp and its gradient with the matmuls' neighbours; the
  ML-1M recipe's step is 7-10% shorter than with matmul +
  sparse_softmax_cross_entropy (tools/bench_trainer.py; docs/design.md,
  trainer decisions, "XLA").
  Item 0 (padding) is left out of the logsumexp rather than masked, and 1/T
  scales the query, not the logits: two passes fewer over the logits.
  """
  query = query * inverse_temperature
  logits = tf.matmul(query, item_vectors[1:], transpose_b=True)
  positive = tf.reduce_sum(query * tf.gather(item_vectors, targets), axis=-1)
  return tf.reduce_sum((tf.reduce_logsumexp(logits, axis=-1) - positive) * weights)


class CatalogueSoftmaxLoss(tf.Module):
  """Softmax over the whole catalogue: every item except padding is a negative.

  The exact cross-entropy the sampled losses approximate, so it needs no
  logQ correction and has no accidental hits. It costs one (queries x items)
  matmul per step, which is cheaper than the in-batch pool whenever the
  catalogue is smaller than the batch's loss positions (ML-1M: 3,706 items
  against 6,400 positions per step). Item index 0 (padding) is never a
  candidate.

  Rows of weight 0 (a window's padding positions) are dropped before the
  matmul: they are 43% of the rows of ML-1M windows of 200 and 85% of Beauty
  windows of 50, and the matmul and its softmax are most of the step. The
  real rows are padded (with weight 0) to a bucket size, so the XLA-compiled
  cross-entropy sees a few static shapes; the gather and the collective stay
  outside XLA, which cannot run them inside a replica step (task.py).
  """

  def __init__(self, temperature: float, name: str | None = None):
    super().__init__(name=name)
    self.temperature = temperature

  def __call__(self, query: tf.Tensor, item_vectors: tf.Tensor, targets: tf.Tensor,
               weights: tf.Tensor) -> tf.Tensor:
    """Returns this replica's share of the global weighted mean loss.

    query: [n, d]; item_vectors: [V, d] for every item index (row 0 padding);
    targets: [n] item indices (>= 1 where the weight is not 0); weights: [n]
    (0 drops the row).
    """
    weights = tf.cast(weights, tf.float32)
    real = tf.cast(tf.where(weights > 0)[:, 0], tf.int32)
    num_real = tf.size(real)
    # Padding rows repeat row 0 with weight 0: finite, and no gradient.
    rows = tf.pad(real, [[0, _row_bucket(num_real) - num_real]])
    is_real = tf.sequence_mask(num_real, tf.size(rows), dtype=tf.float32)
    total = _weighted_catalogue_cross_entropy(
        tf.cast(tf.gather(query, rows), tf.float32), tf.cast(item_vectors, tf.float32),
        tf.gather(targets, rows), tf.gather(weights, rows) * is_real,
        tf.constant(1.0 / self.temperature, tf.float32))
    weight_sum = tf.reduce_sum(weights)
    ctx = tf.distribute.get_replica_context()
    if ctx is not None and ctx.num_replicas_in_sync > 1:
      weight_sum = ctx.all_reduce(tf.distribute.ReduceOp.SUM, weight_sum)
    return total / tf.maximum(weight_sum, 1.0)


class CatalogueSampler(tf.Module):
  """Draws negatives from the whole catalogue (item indices 1..V-1), with replacement.

  uniform: every item equally likely; popularity: proportional to its
  training target count (`counts`, at least 1 each, so every item can be
  drawn). `log_expected_count(ids)` is log(N q(id)) for a sample of N, the
  logQ correction of the sampled softmax (Jean et al. 2015; Bengio and
  Senecal 2008): with it the sampled loss is an unbiased-in-the-limit
  estimate of the full softmax, and for uniform sampling it is a constant
  that changes nothing.
  """

  def __init__(self, num_items: int, kind: str = "uniform", counts=None, name=None):
    super().__init__(name=name)
    if kind not in ("uniform", "popularity"):
      raise ValueError(f"unknown sampler {kind!r}")
    self.num_items, self.kind = num_items, kind
    if kind == "uniform":
      probability = np.full(num_items - 1, 1.0 / (num_items - 1))
    else:
      weights = np.maximum(np.asarray(counts, np.float64)[1:num_items], 1.0)
      probability = weights / weights.sum()
    # Row 0 (padding) is never drawn; its log-probability is kept finite.
    self.log_probability = tf.constant(
        np.log(np.concatenate([[1.0], probability])).astype(np.float32))
    cdf = np.cumsum(probability)
    cdf[-1] = 1.0
    self.cdf = tf.constant(cdf, tf.float64)

  def sample(self, n: int, seed: tf.Tensor) -> tf.Tensor:
    """[n] int32 item indices in [1, V), a function of `seed` ([2] int64) only."""
    if self.kind == "uniform":
      return tf.random.stateless_uniform([n], seed=seed, minval=1, maxval=self.num_items,
                                         dtype=tf.int32, alg="philox")
    u = tf.random.stateless_uniform([n], seed=seed, dtype=tf.float64, alg="philox")
    index = tf.searchsorted(self.cdf, u, side="right")
    return tf.cast(tf.minimum(index, self.num_items - 2), tf.int32) + 1

  def log_expected_count(self, ids: tf.Tensor, n: int) -> tf.Tensor:
    return tf.gather(self.log_probability, ids) + tf.math.log(float(n))


@tf.function(jit_compile=True)
def _weighted_sampled_cross_entropy(query, positive, positive_log_q, sample, sample_log_q,
                                    is_hit, weights, inverse_temperature):
  """sum_i w_i (logsumexp([p_i, n_i1..n_iN]) - p_i), with p_i = q_i.v_i / T - logQ(i)
  and n_ij = q_i.s_j / T - logQ(j), n_ij left out where sample j is row i's positive."""
  query = query * inverse_temperature
  positive_logit = tf.reduce_sum(query * positive, axis=-1) - positive_log_q
  negative_logits = tf.matmul(query, sample, transpose_b=True) - sample_log_q[None, :]
  negative_logits = tf.where(is_hit, large_negative(negative_logits.dtype),
                             negative_logits)
  logits = tf.concat([positive_logit[:, None], negative_logits], axis=1)
  return tf.reduce_sum((tf.reduce_logsumexp(logits, axis=-1) - positive_logit) * weights)


class SampledSoftmaxLoss(tf.Module):
  """Softmax over each row's positive and N negatives shared by the whole step.

  The negatives come from the catalogue (CatalogueSampler), not the batch,
  so every item can be a negative whatever the batch holds; this is the loss
  of SASRec+SS, gSASRec's softmax baseline and HSTU, and the way a catalogue
  too large for the full softmax gets thousands of negatives. A sampled item
  equal to the row's positive is not one of its negatives. Each logit loses
  log(N q(item)) (logQ). Rows of weight 0 are dropped before the matmul and
  the real ones padded to a bucket size, as in CatalogueSoftmaxLoss. With the
  whole catalogue as the sample (uniform, N = V - 1) it equals that loss.
  """

  def __init__(self, temperature: float, name: str | None = None):
    super().__init__(name=name)
    self.temperature = temperature

  def __call__(self, query: tf.Tensor, positive_vectors: tf.Tensor, positive_ids: tf.Tensor,
               weights: tf.Tensor, sample_vectors: tf.Tensor, sample_ids: tf.Tensor,
               positive_log_q: tf.Tensor, sample_log_q: tf.Tensor) -> tf.Tensor:
    """Returns this replica's share of the global weighted mean loss.

    query, positive_vectors: [n, d]; positive_ids, weights, positive_log_q:
    [n]; sample_vectors: [N, d]; sample_ids, sample_log_q: [N].
    """
    weights = tf.cast(weights, tf.float32)
    real = tf.cast(tf.where(weights > 0)[:, 0], tf.int32)
    num_real = tf.size(real)
    rows = tf.pad(real, [[0, _row_bucket(num_real) - num_real]])
    is_real = tf.sequence_mask(num_real, tf.size(rows), dtype=tf.float32)
    ids = tf.gather(positive_ids, rows)
    total = _weighted_sampled_cross_entropy(
        tf.cast(tf.gather(query, rows), tf.float32),
        tf.cast(tf.gather(positive_vectors, rows), tf.float32),
        tf.cast(tf.gather(positive_log_q, rows), tf.float32),
        tf.cast(sample_vectors, tf.float32), tf.cast(sample_log_q, tf.float32),
        tf.equal(ids[:, None], tf.cast(sample_ids, ids.dtype)[None, :]),
        tf.gather(weights, rows) * is_real, tf.constant(1.0 / self.temperature, tf.float32))
    weight_sum = tf.reduce_sum(weights)
    ctx = tf.distribute.get_replica_context()
    if ctx is not None and ctx.num_replicas_in_sync > 1:
      weight_sum = ctx.all_reduce(tf.distribute.ReduceOp.SUM, weight_sum)
    return total / tf.maximum(weight_sum, 1.0)
