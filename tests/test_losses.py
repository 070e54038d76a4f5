"""InBatchSoftmaxLoss and CatalogueSoftmaxLoss on tiny tensors; expected values
derived by hand.

Temperature 1 throughout, so logits are plain dot products.
"""

import numpy as np
import pytest
import tensorflow as tf

from trainer import strategies
from trainer.losses import (CatalogueSampler, CatalogueSoftmaxLoss, InBatchSoftmaxLoss,
                            SampledSoftmaxLoss, _row_bucket)


def loss_value(q, c, ids, weights=None, log_q=None, **options):
  options = {"remove_accidental_hits": False, "logq_correction": log_q is not None, **options}
  layer = InBatchSoftmaxLoss(temperature=1.0, **options)
  q, c = tf.constant(q, tf.float32), tf.constant(c, tf.float32)
  weights = tf.ones([len(ids)]) if weights is None else tf.constant(weights, tf.float32)
  log_q = None if log_q is None else tf.constant(np.log(log_q), tf.float32)
  return float(layer(q, c, tf.constant(ids), weights, log_q))


def test_plain_in_batch_softmax_2x2():
  # logits = I: each row is log(e^1 + e^0) - 1 = log(e + 1) - 1 = 0.3132617.
  assert loss_value([[1, 0], [0, 1]], np.eye(2), [1, 2]) == pytest.approx(0.3132617, abs=1e-6)


def test_accidental_hits_3x3():
  # q = c = I3, items [5, 5, 7]. Kept: each row log(e + 2) - 1 = 0.5514447.
  # Removed: rows 0 and 1 drop each other (same item 5): log(e + 1) - 1 =
  # 0.3132617; row 2 keeps both: 0.5514447; mean 0.3926560.
  q = np.eye(3)
  assert loss_value(q, q, [5, 5, 7]) == pytest.approx(0.5514447, abs=1e-6)
  assert loss_value(q, q, [5, 5, 7], remove_accidental_hits=True) == pytest.approx(
      0.3926560, abs=1e-6)


def test_logq_correction_2x2():
  # Sampling probabilities q = [0.5, 0.25]; every logit of candidate j loses log q_j.
  # Row 0: logits [1 + ln 2, 0 + ln 4] -> log(2e + 4) - (1 + ln 2) = 0.5514447.
  # Row 1: logits [0 + ln 2, 1 + ln 4] -> log(2 + 4e) - (1 + ln 4) = 0.1688476.
  # Mean 0.3601462: the popular item 0 is penalised less as a negative.
  assert loss_value(np.eye(2), np.eye(2), [1, 2], log_q=[0.5, 0.25]) == pytest.approx(
      0.3601462, abs=1e-6)


def test_symmetric_2x2():
  # q = [[1, 0], [0.6, 0.8]], c = I. query->item rows: log(e + 1) - 1 = 0.3132617,
  # log(e^.6 + e^.8) - .8 = 0.5981389. item->query: candidate 0 sees [1, .6]:
  # log(e + e^.6) - 1 = 0.5130153; candidate 1 sees [0, .8]: log(1 + e^.8) - .8 =
  # 0.3711007. Mean of the per-row averages: 0.4488791.
  q = [[1, 0], [0.6, 0.8]]
  assert loss_value(q, np.eye(2), [1, 2], symmetric=True) == pytest.approx(0.4488791, abs=1e-6)


def test_zero_weight_rows_are_neither_queries_nor_negatives():
  # A third, padding row must change nothing: same as the plain 2x2 case.
  q = [[1, 0], [0, 1], [0.7, 0.7]]
  c = [[1, 0], [0, 1], [0.7, 0.7]]
  assert loss_value(q, c, [1, 2, 3], weights=[1, 1, 0]) == pytest.approx(0.3132617, abs=1e-6)


def test_temperature_scales_logits():
  layer = InBatchSoftmaxLoss(temperature=0.5, remove_accidental_hits=False,
                             logq_correction=False)
  # logits = 2 I: log(e^2 + 1) - 2 = 0.1269280.
  value = layer(tf.eye(2), tf.eye(2), tf.constant([1, 2]), tf.ones([2]))
  assert float(value) == pytest.approx(0.1269280, abs=1e-6)


def test_sampled_pool_draws_only_real_candidates():
  # Candidates 0..5 with rows 1 and 4 padding; a pool of 4000 draws over the
  # 4 real ones must never pick 1 or 4 and hit each real one ~1000 times.
  layer = InBatchSoftmaxLoss(temperature=1.0, logq_correction=False, num_negatives=4000)
  weights = tf.constant([1, 0, 1, 1, 0, 1], tf.float32)
  counts = np.zeros(6)
  captured = {}
  original = tf.gather

  def spy(params, indices, *args, **kwargs):
    if "pool" not in captured and indices.shape.rank == 1 and indices.shape[0] == 4000:
      captured["pool"] = indices
    return original(params, indices, *args, **kwargs)

  tf.gather = spy
  try:
    layer(tf.eye(6), tf.eye(6), tf.range(6), weights, seed=tf.constant([1, 2]))
  finally:
    tf.gather = original
  np.add.at(counts, captured["pool"].numpy(), 1)
  assert counts[1] == counts[4] == 0
  assert counts[[0, 2, 3, 5]].min() > 850 and counts.sum() == 4000


def test_sampled_pool_is_deterministic_per_seed_and_needs_no_symmetric():
  layer = InBatchSoftmaxLoss(temperature=1.0, logq_correction=False, num_negatives=2)
  q = tf.math.l2_normalize(tf.random.stateless_normal([8, 4], seed=[0, 1]), -1)
  args = (q, q, tf.range(8), tf.ones([8]))
  a = float(layer(*args, seed=tf.constant([3, 4])))
  assert a == float(layer(*args, seed=tf.constant([3, 4])))
  assert a != float(layer(*args, seed=tf.constant([3, 5])))
  with pytest.raises(ValueError, match="symmetric"):
    InBatchSoftmaxLoss(temperature=1.0, symmetric=True, num_negatives=2)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.slow
def test_cross_replica_loss_and_gradients_equal_single_device(symmetric):
  """2 replicas with gathered negatives == one device on the global batch."""
  strategy = strategies.mirrored(("/cpu:0", "/cpu:1"))
  rng = np.random.default_rng(0)
  x = rng.normal(size=(8, 5)).astype(np.float32)
  ids = np.array([1, 2, 3, 1, 4, 5, 2, 6], np.int32)  # accidental hits across replicas
  weights = np.array([1, 1, 1, 0, 1, 1, 1, 1], np.float32)
  log_q = np.log(rng.uniform(0.01, 0.2, size=8)).astype(np.float32)
  layer = InBatchSoftmaxLoss(temperature=0.3, remove_accidental_hits=True,
                             logq_correction=True, symmetric=symmetric, cross_replica=True)
  with strategy.scope():
    w_query = tf.Variable(rng.normal(size=(5, 4)).astype(np.float32))
    w_item = tf.Variable(rng.normal(size=(5, 4)).astype(np.float32))

  def loss_and_grads(x, ids, weights, log_q):
    with tf.GradientTape() as tape:
      q = tf.math.l2_normalize(x @ w_query, -1)
      c = tf.math.l2_normalize(x @ w_item, -1)
      loss = layer(q, c, ids, weights, log_q)
    return loss, tape.gradient(loss, [w_query, w_item])

  single_loss, single_grads = loss_and_grads(x, ids, weights, log_q)

  def slices(ctx):
    r = ctx.replica_id_in_sync_group
    return tuple(tf.constant(a[4 * r:4 * r + 4]) for a in (x, ids, weights, log_q))

  per_replica = strategy.experimental_distribute_values_from_function(slices)
  # As in the trainer: strategy.run inside a tf.function (eager collectives
  # from two replica threads can be issued in different orders).
  losses, grads = tf.function(lambda v: strategy.run(lambda args: loss_and_grads(*args),
                                                     args=(v,)))(per_replica)
  total = sum(float(v) for v in strategy.experimental_local_results(losses))
  assert total == pytest.approx(float(single_loss), rel=1e-5)
  for g_single, g_replicas in zip(single_grads, grads):
    summed = sum(v.numpy() for v in strategy.experimental_local_results(g_replicas))
    np.testing.assert_allclose(summed, g_single.numpy(), rtol=1e-4, atol=1e-6)


def test_catalogue_softmax_3_items_padding_never_a_negative():
  # Items: row 0 padding (a huge vector that would dominate if it counted), rows
  # 1, 2 = e1, e2. Query e1 with target 1: logits [1, 0] over items 1, 2 ->
  # log(e + 1) - 1 = 0.3132617. Query (0.6, 0.8) with target 2: logits
  # [0.6, 0.8] -> log(e^.6 + e^.8) - .8 = 0.5981389. A padding row (weight 0,
  # target 0) adds nothing. Mean 0.4557003.
  items = tf.constant([[50.0, 50.0], [1, 0], [0, 1]])
  q = tf.constant([[1.0, 0], [0.6, 0.8], [0.3, 0.3]])
  layer = CatalogueSoftmaxLoss(temperature=1.0)
  value = layer(q, items, tf.constant([1, 2, 0]), tf.constant([1.0, 1.0, 0.0]))
  assert float(value) == pytest.approx(0.4557003, abs=1e-6)
  # Temperature 0.5 doubles the logits: row 0 log(e^2 + 1) - 2 = 0.1269280,
  # row 1 log(e^1.2 + e^1.6) - 1.6 = 0.5130153; mean 0.3199717.
  value = CatalogueSoftmaxLoss(temperature=0.5)(q, items, tf.constant([1, 2, 0]),
                                                tf.constant([1.0, 1.0, 0.0]))
  assert float(value) == pytest.approx(0.3199717, abs=1e-6)


def test_catalogue_softmax_gradient_is_finite_with_padding_rows():
  items = tf.Variable([[0.0, 0.0], [1, 0], [0, 1]])
  with tf.GradientTape() as tape:
    value = CatalogueSoftmaxLoss(temperature=0.05)(tf.constant([[1.0, 0], [0, 0]]), items,
                                                   tf.constant([1, 0]), tf.constant([1.0, 0.0]))
  grad = tape.gradient(value, items)
  assert np.all(np.isfinite(grad.numpy())) and np.all(grad.numpy()[0] == 0)


def test_catalogue_softmax_drops_padding_rows_even_when_all_are_padding():
  # The padding query (row 1) is dropped before the matmul: its gradient is 0.
  # A batch of padding only (a replica whose slice has no real row) is 0, not NaN.
  items = tf.constant([[0.0, 0.0], [1, 0], [0, 1]])
  q = tf.Variable([[1.0, 0], [5.0, 5.0]])
  layer = CatalogueSoftmaxLoss(temperature=1.0)
  with tf.GradientTape() as tape:
    value = layer(q, items, tf.constant([1, 0]), tf.constant([1.0, 0.0]))
  assert float(value) == pytest.approx(0.3132617, abs=1e-6)  # log(e + 1) - 1, as above
  np.testing.assert_array_equal(tf.convert_to_tensor(tape.gradient(value, q))[1], [0.0, 0.0])
  with tf.GradientTape() as tape:
    value = layer(q, items, tf.constant([0, 0]), tf.constant([0.0, 0.0]))
  assert float(value) == 0.0
  np.testing.assert_array_equal(tf.convert_to_tensor(tape.gradient(value, q)), np.zeros((2, 2)))


def test_row_bucket_8_sizes_per_octave():
  # 1..64 -> 64 (the floor); 65 -> 128 (octave 6, step 8 would be < 64);
  # 1000: octave 9, step 64 -> 1024; 7300: octave 12, step 512 -> 7680;
  # 8192 is a bucket itself; 8193: octave 13, step 1024 -> 9216.
  got = [int(_row_bucket(tf.constant(n))) for n in (0, 1, 64, 65, 1000, 7300, 8192, 8193)]
  assert got == [64, 64, 64, 128, 1024, 7680, 8192, 9216]


def test_catalogue_softmax_matches_a_plain_softmax_and_its_gradients():
  """A row count that is not a bucket (padded inside) and a random mask."""
  rng = np.random.default_rng(3)
  q = tf.Variable(rng.normal(size=(300, 8)).astype(np.float32))
  items = tf.Variable(rng.normal(size=(40, 8)).astype(np.float32))
  targets = tf.constant(rng.integers(1, 40, 300).astype(np.int32))
  weights = tf.constant((rng.random(300) < 0.6).astype(np.float32))
  with tf.GradientTape(persistent=True) as tape:
    got = CatalogueSoftmaxLoss(temperature=0.1)(q, items, targets, weights)
    logits = tf.matmul(q, items[1:], transpose_b=True) / 0.1
    per_row = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets - 1, logits=logits)
    want = tf.reduce_sum(per_row * weights) / tf.reduce_sum(weights)
  assert float(got) == pytest.approx(float(want), rel=1e-5)
  for g_got, g_want in zip(tape.gradient(got, [q, items]), tape.gradient(want, [q, items])):
    np.testing.assert_allclose(tf.convert_to_tensor(g_got), tf.convert_to_tensor(g_want),
                               rtol=1e-4, atol=1e-6)


def test_catalogue_softmax_on_two_replicas_equals_single_device():
  """Each replica's share sums to the global weighted mean, unequal real rows per replica."""
  strategy = strategies.mirrored(("/cpu:0", "/cpu:1"))
  rng = np.random.default_rng(1)
  q = rng.normal(size=(4, 3)).astype(np.float32)
  items = tf.constant(rng.normal(size=(5, 3)).astype(np.float32))
  targets = np.array([1, 4, 2, 3], np.int32)
  weights = np.array([1, 1, 0, 1], np.float32)  # replica 0 has two real rows, replica 1 one
  layer = CatalogueSoftmaxLoss(temperature=0.5)
  single = float(layer(q, items, targets, weights))

  def slices(ctx):
    r = ctx.replica_id_in_sync_group
    return tuple(tf.constant(a[2 * r:2 * r + 2]) for a in (q, targets, weights))

  per_replica = strategy.experimental_distribute_values_from_function(slices)
  shares = tf.function(lambda v: strategy.run(lambda a: layer(a[0], items, a[1], a[2]),
                                              args=(v,)))(per_replica)
  total = sum(float(v) for v in strategy.experimental_local_results(shares))
  assert total == pytest.approx(single, rel=1e-5)


def sampled_value(q, positive, positive_ids, sample, sample_ids, positive_log_q, sample_log_q,
                  weights=None, temperature=1.0):
  weights = np.ones(len(positive_ids)) if weights is None else weights
  as_float = lambda a: tf.constant(a, tf.float32)  # noqa: E731
  return float(SampledSoftmaxLoss(temperature)(
      as_float(q), as_float(positive), tf.constant(positive_ids), as_float(weights),
      as_float(sample), tf.constant(sample_ids), as_float(positive_log_q),
      as_float(sample_log_q)))


def test_sampled_softmax_removes_the_positive_from_its_negatives():
  # Row 0: query e1, positive item 3 = e1 (logit 1); the sample is items 7 (e2,
  # logit 0) and 3 (the positive itself, left out): log(e + 1) - 1 = 0.3132617.
  # Row 1: query e2, positive item 7 = e2 (logit 1); item 3 (logit 0) is a
  # negative, item 7 is not: 0.3132617 again. No logQ (all 0). Mean 0.3132617.
  value = sampled_value([[1, 0], [0, 1]], [[1, 0], [0, 1]], [3, 7], [[0, 1], [1, 0]], [7, 3],
                        [0, 0], [0, 0])
  assert value == pytest.approx(0.3132617, abs=1e-6)


def test_sampled_softmax_logq_correction_by_hand():
  # One row: query e1, positive (item 1, vector e1) logit 1 with log Q = ln 0.5;
  # one sampled item 2 (vector e2) logit 0 with log Q = ln 0.25. Corrected
  # logits: 1 - ln 0.5 = 1 + ln 2 and 0 + ln 4, so the loss is
  # log(e^(1 + ln 2) + e^(ln 4)) - (1 + ln 2) = log(2e + 4) - 1 - ln 2 = 0.5514447.
  # Uncorrected: log(e + 1) - 1 = 0.3132617. A weight-0 row adds nothing.
  q, pos, sample = [[1, 0], [0.3, 0.3]], [[1, 0], [1, 0]], [[0, 1]]
  assert sampled_value(q, pos, [1, 1], sample, [2], np.log([0.5, 0.5]), np.log([0.25]),
                       weights=[1, 0]) == pytest.approx(0.5514447, abs=1e-6)
  assert sampled_value(q, pos, [1, 1], sample, [2], [0, 0], [0],
                       weights=[1, 0]) == pytest.approx(0.3132617, abs=1e-6)


def test_sampled_softmax_over_the_whole_catalogue_equals_the_full_softmax():
  """Uniform sampler, the sample = every item once: log(N q) = log((V-1)/(V-1)) = 0."""
  rng = np.random.default_rng(5)
  num_items = 30
  items = tf.math.l2_normalize(tf.constant(rng.normal(size=(num_items, 6)), tf.float32), -1)
  q = tf.math.l2_normalize(tf.constant(rng.normal(size=(50, 6)), tf.float32), -1)
  targets = tf.constant(rng.integers(1, num_items, 50).astype(np.int32))
  weights = tf.constant((rng.random(50) < 0.7).astype(np.float32))
  sampler = CatalogueSampler(num_items, "uniform")
  everything = tf.range(1, num_items)
  log_q = sampler.log_expected_count(everything, num_items - 1)
  np.testing.assert_allclose(log_q.numpy(), 0.0, atol=1e-6)
  full = CatalogueSoftmaxLoss(temperature=0.1)(q, items, targets, weights)
  sampled = SampledSoftmaxLoss(temperature=0.1)(
      q, tf.gather(items, targets), targets, weights, tf.gather(items, everything), everything,
      sampler.log_expected_count(targets, num_items - 1), log_q)
  assert float(sampled) == pytest.approx(float(full), rel=1e-5)


def test_catalogue_sampler_draws_items_1_to_v_minus_1_by_its_distribution():
  # Counts 0 (padding), 1, 1, 2, 4: popularity q = [1, 1, 2, 4] / 8 over items 1..4.
  counts = [0, 1, 1, 2, 4]
  seed = tf.constant([3, 4], tf.int64)
  for kind, expected in (("uniform", [0.25] * 4), ("popularity", [0.125, 0.125, 0.25, 0.5])):
    sampler = CatalogueSampler(5, kind, counts)
    draws = sampler.sample(40000, seed).numpy()
    assert draws.min() >= 1 and draws.max() <= 4
    share = np.bincount(draws, minlength=5)[1:] / len(draws)
    np.testing.assert_allclose(share, expected, atol=0.01)
    np.testing.assert_array_equal(draws, sampler.sample(40000, seed).numpy())  # seeded
    # log(N q) for N = 8: log 8 + log q.
    np.testing.assert_allclose(sampler.log_expected_count(tf.constant([1, 4]), 8).numpy(),
                               np.log(8 * np.array(expected)[[0, 3]]), rtol=1e-6)
  assert not np.array_equal(draws, sampler.sample(40000, tf.constant([3, 5], tf.int64)).numpy())


def test_sampled_softmax_on_two_replicas_equals_single_device():
  """One sample for the step, each replica's rows: the shares sum to the global mean."""
  strategy = strategies.mirrored(("/cpu:0", "/cpu:1"))
  rng = np.random.default_rng(2)
  q = rng.normal(size=(4, 3)).astype(np.float32)
  pos = rng.normal(size=(4, 3)).astype(np.float32)
  ids = np.array([1, 4, 2, 3], np.int32)
  weights = np.array([1, 1, 0, 1], np.float32)
  sample, sample_ids = tf.constant(rng.normal(size=(3, 3)), tf.float32), tf.constant([4, 2, 1])
  pos_log_q = np.log(np.array([0.1, 0.2, 0.3, 0.4], np.float32))
  sample_log_q = tf.constant(np.log([0.2, 0.3, 0.1]), tf.float32)
  layer = SampledSoftmaxLoss(temperature=0.5)
  single = float(layer(q, pos, ids, weights, sample, sample_ids, pos_log_q, sample_log_q))

  def slices(ctx):
    r = ctx.replica_id_in_sync_group
    return tuple(tf.constant(a[2 * r:2 * r + 2]) for a in (q, pos, ids, weights, pos_log_q))

  per_replica = strategy.experimental_distribute_values_from_function(slices)
  shares = tf.function(lambda v: strategy.run(
      lambda a: layer(a[0], a[1], a[2], a[3], sample, sample_ids, a[4], sample_log_q),
      args=(v,)))(per_replica)
  total = sum(float(v) for v in strategy.experimental_local_results(shares))
  assert total == pytest.approx(single, rel=1e-5)
