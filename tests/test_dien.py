"""DIEN ranker: the attentional GRU cells by hand, padding, losses, a jit-compiled fit."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer.dien import DIEN, GRUCell, run_gru

NUM_ITEMS, NUM_USERS, NUM_CATEGORIES, F = 20, 5, 3, 2


def sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def numpy_gru(x, kernel, recurrent, bias):
  """Reference GRU ([r, u, h] gate order, reset after U_h) over x [B, L, D], zero start."""
  units = recurrent.shape[0]
  h = np.zeros([x.shape[0], units], np.float64)
  states = []
  for t in range(x.shape[1]):
    gx = x[:, t] @ kernel + bias
    gh = h @ recurrent
    r = sigmoid(gx[:, :units] + gh[:, :units])
    u = sigmoid(gx[:, units:2 * units] + gh[:, units:2 * units])
    candidate = np.tanh(gx[:, 2 * units:] + r * gh[:, 2 * units:])
    h = (1 - u) * h + u * candidate
    states.append(h)
  return np.stack(states, axis=1)


def random_cell(dim=4, units=3, seed=0):
  cell = GRUCell(units)
  cell.build((None, dim))
  rng = np.random.default_rng(seed)
  for variable in (cell.kernel, cell.recurrent_kernel, cell.bias):
    variable.assign(rng.normal(0, 0.7, variable.shape).astype(np.float32))
  return cell


def test_attention_one_reduces_augru_and_aigru_to_the_plain_gru():
  cell = random_cell()
  x = np.random.default_rng(1).normal(size=[2, 5, 4]).astype(np.float32)
  mask = tf.ones([2, 5], tf.bool)
  ones = tf.ones([2, 5])
  plain = run_gru(cell, x, mask, return_sequences=True).numpy()
  expected = numpy_gru(x.astype(np.float64), cell.kernel.numpy(), cell.recurrent_kernel.numpy(),
                       cell.bias.numpy())
  np.testing.assert_allclose(plain, expected, atol=1e-5)
  for mode in ("augru", "aigru"):
    modulated = run_gru(cell, x, mask, attention=ones, mode=mode, return_sequences=True)
    np.testing.assert_allclose(modulated.numpy(), plain, atol=1e-6)
  # And attention != 1 does change them (the test above is not vacuous).
  half = run_gru(cell, x, mask, attention=ones * 0.5, mode="augru")
  assert not np.allclose(half.numpy(), plain[:, -1], atol=1e-3)


def test_augru_attention_zero_keeps_the_state():
  cell = random_cell()
  x = np.random.default_rng(2).normal(size=[2, 4, 4]).astype(np.float32)
  attention = tf.constant([[1.0, 0.0, 0.7, 0.0], [0.3, 0.0, 0.0, 1.0]])
  states = run_gru(cell, x, tf.ones([2, 4], tf.bool), attention=attention, mode="augru",
                   return_sequences=True).numpy()
  np.testing.assert_array_equal(states[0, 1], states[0, 0])
  np.testing.assert_array_equal(states[0, 3], states[0, 2])
  np.testing.assert_array_equal(states[1, 2], states[1, 1])
  np.testing.assert_array_equal(states[1, 1], states[1, 0])
  assert not np.allclose(states[0, 2], states[0, 1])


def test_single_step_of_a_one_unit_cell_by_hand():
  cell = GRUCell(1)
  cell.build((None, 1))
  # Gate order [r, u, h]: W = [0.5, -0.5, 1], U = [2, 2, -1], b = [-2, 0, 0.25].
  cell.kernel.assign([[0.5, -0.5, 1.0]])
  cell.recurrent_kernel.assign([[2.0, 2.0, -1.0]])
  cell.bias.assign([-2.0, 0.0, 0.25])
  x, h = tf.constant([[2.0]]), tf.constant([[0.5]])
  # x = 2, h = 0.5:
  #   r  = σ(0.5·2 + 2·0.5 - 2) = σ(0) = 0.5
  #   u  = σ(-0.5·2 + 2·0.5 + 0) = σ(0) = 0.5
  #   h~ = tanh(1·2 + r·(-1·0.5) + 0.25) = tanh(2)
  #   h' = (1 - u)·h + u·h~ = 0.25 + 0.5·tanh(2) ≈ 0.7320138
  assert float(cell(x, h)[0, 0]) == pytest.approx(0.25 + 0.5 * math.tanh(2.0), abs=1e-6)
  # AUGRU, a = 0.5: u' = 0.25, h' = 0.75·0.5 + 0.25·tanh(2) ≈ 0.6160069.
  a = tf.constant([0.5])
  assert float(cell(x, h, a, mode="augru")[0, 0]) == pytest.approx(
      0.375 + 0.25 * math.tanh(2.0), abs=1e-6)
  # AIGRU, a = 0.5: x' = 1, r = σ(0.5 + 1 - 2) = σ(-0.5), u = σ(-0.5 + 1) = σ(0.5),
  # h~ = tanh(1 - 0.5·r + 0.25), h' = (1 - u)·0.5 + u·h~.
  r, u = sigmoid(-0.5), sigmoid(0.5)
  expected = (1 - u) * 0.5 + u * math.tanh(1.25 - 0.5 * r)
  assert float(cell(x, h, a, mode="aigru")[0, 0]) == pytest.approx(expected, abs=1e-6)
  # AUGRU, a = 0: u' = 0, h' = h.
  assert float(cell(x, h, tf.constant([0.0]), mode="augru")[0, 0]) == 0.5


def test_padded_steps_carry_the_state_whatever_the_input():
  cell = random_cell()
  rng = np.random.default_rng(3)
  real = rng.normal(size=[2, 2, 4]).astype(np.float32)
  garbage = rng.normal(size=[2, 3, 4]).astype(np.float32) * 10
  padded = np.concatenate([garbage, real], axis=1)
  mask = tf.constant([[False] * 3 + [True] * 2] * 2)
  states = run_gru(cell, padded, mask, return_sequences=True).numpy()
  np.testing.assert_array_equal(states[:, :3], 0.0)  # state stays 0 until the first click
  np.testing.assert_allclose(states[:, 3:], run_gru(cell, real, tf.ones([2, 2], tf.bool),
                                                    return_sequences=True).numpy(), atol=1e-6)


def make_model(max_hist_len=5, **overrides):
  item_category = np.arange(NUM_ITEMS, dtype=np.int32) % NUM_CATEGORIES
  kwargs = dict(num_items=NUM_ITEMS, num_users=NUM_USERS, num_categories=NUM_CATEGORIES,
                item_category=item_category, max_hist_len=max_hist_len,
                dense_mean=np.array([10.0, 3.0], np.float32),
                dense_var=np.array([4.0, 0.0], np.float32),
                emb_dim=8, gru_units=8, mlp_units=(16, 8), attention_units=(8, 4),
                evolution="aigru", dropout=0.2, aux_loss=False, wide_dense=False)
  kwargs.update(overrides)
  return DIEN(**kwargs).build_variables()


def batch(histories, seed=0):
  rng = np.random.default_rng(seed)
  n = len(histories)
  return {"user": tf.constant(rng.integers(0, NUM_USERS, n), tf.int32),
          "history": tf.constant(histories, tf.int32),
          "candidate": tf.constant(rng.integers(1, NUM_ITEMS, n), tf.int32),
          "dense": tf.constant(rng.normal([10.0, 3.0], 2.0, [n, F]), tf.float32)}


@pytest.mark.parametrize("evolution", ["aigru", "augru"])
def test_left_padding_gives_the_logits_of_the_unpadded_history(evolution):
  keras.utils.set_random_seed(0)  # the inequality below is ~1e-3 at this init
  long, short = make_model(4, evolution=evolution), make_model(2, evolution=evolution)
  short.set_weights(long.get_weights())  # no weight depends on the history length
  padded, unpadded = batch([[0, 0, 5, 7], [0, 3, 9, 2]]), batch([[5, 7], [9, 2]])
  logits, expected = long(padded).numpy(), short(unpadded).numpy()
  np.testing.assert_allclose(logits[0], expected[0], atol=1e-7)
  assert abs(logits[1] - expected[1]) > 1e-4  # 3 is a real click, so not vacuous


def test_forward_shapes_and_auxiliary_loss():
  histories = [[0, 0, 4, 5, 6], [1, 2, 3, 4, 5], [0, 0, 0, 0, 7], [0, 0, 0, 0, 0]]
  plain = make_model()
  logits, aux = plain.forward(batch(histories))
  assert logits.shape == [4] and logits.dtype == tf.float32
  assert np.all(np.isfinite(logits.numpy())) and float(aux) == 0.0
  assert not any("aux" in v.path for v in plain.variables)

  with_aux = make_model(evolution="augru", aux_loss=True)
  assert any("aux" in v.path for v in with_aux.trainable_variables)
  logits, aux = with_aux.forward(batch(histories), training=True,
                                 seed=tf.constant([1, 2], tf.int64))
  assert np.all(np.isfinite(logits.numpy())) and float(aux) > 0.0
  # No pair of consecutive clicks: nothing to score.
  _, aux = with_aux.forward(batch([[0, 0, 0, 0, 7], [0, 0, 0, 0, 0]]))
  assert float(aux) == 0.0


@pytest.mark.slow
def test_jit_compiled_adam_steps_reduce_the_loss():
  # Small: XLA's compile of the unrolled GRUs and their gradients is most of the time.
  keras.utils.set_random_seed(1)
  model = make_model(3, evolution="augru", aux_loss=True, mlp_units=(16,), attention_units=(8,))
  optimizer = keras.optimizers.Adam(learning_rate=0.01)
  variables = model.trainable_variables
  optimizer.build(variables)
  rng = np.random.default_rng(4)
  histories = rng.integers(1, NUM_ITEMS, [8, 3])
  histories[:4, :1] = 0
  inputs = batch(histories.tolist(), seed=5)
  labels = tf.constant([1, 0, 1, 1, 0, 0, 1, 0], tf.float32)

  def bce(logits):
    return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels, logits))

  @tf.function(jit_compile=True)
  def train_step(step):
    seed = tf.stack([tf.constant(7, tf.int64), tf.cast(step, tf.int64)])
    with tf.GradientTape() as tape:
      logits, aux = model.forward(inputs, training=True, seed=seed)
      loss = bce(logits) + aux
    optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
    return loss

  before = float(bce(model(inputs)))
  for step in range(20):
    assert np.isfinite(float(train_step(tf.constant(step))))
  after = float(bce(model(inputs)))
  assert after < 0.7 * before, (before, after)


def test_constant_dense_feature_is_standardised_without_blowing_up():
  model = make_model()
  inputs = batch([[0, 0, 0, 1, 2]] * 3)
  inputs["dense"] = tf.constant([[10.0, 3.0], [12.0, 1e4], [8.0, -1e4]])  # column 1: var 0
  standardised = model.standardise(inputs["dense"]).numpy()
  np.testing.assert_allclose(standardised[:, 0], [0.0, 1.0, -1.0], atol=1e-5)
  assert np.all(np.isfinite(standardised)) and standardised[0, 1] == 0.0
  assert np.all(np.isfinite(model(inputs).numpy()))
  assert {v.path.split("/")[-1] for v in model.non_trainable_variables} >= {"dense_mean",
                                                                            "dense_var"}


def test_retrieval_item_vectors_are_frozen_features_of_every_item():
  vectors = np.random.default_rng(0).normal(size=(NUM_ITEMS, 3)).astype(np.float32)
  model = make_model(item_vectors=vectors)
  rep = model.item_representation(tf.constant([[4, 7]])).numpy()
  # The last 3 columns of an item's representation are its retrieval vector.
  np.testing.assert_allclose(rep[0, :, -3:], vectors[[4, 7]])
  assert all("retrieval_item_vectors" not in v.name for v in model.trainable_variables)


def test_wide_dense_adds_a_linear_term_of_the_standardised_features():
  model = make_model(wide_dense=True)
  inputs = batch([[0, 1, 2, 3, 4], [0, 0, 0, 5, 6]])
  base = model.forward(inputs)[0].numpy()
  # Raising the wide weight of feature 0 by 1 moves each logit by its
  # standardised feature 0 and nothing else.
  kernel = model.wide.kernel
  kernel.assign(kernel + np.eye(kernel.shape[0], 1, dtype=np.float32))
  moved = model.forward(inputs)[0].numpy()
  np.testing.assert_allclose(moved - base, model.standardise(inputs["dense"]).numpy()[:, 0],
                             rtol=1e-5, atol=1e-6)


def test_a_model_only_checkpoint_restores_every_weight(tmp_path):
  """Keras 3 hides list attributes (the MLPs) from tf.train.Checkpoint unless
  models.checkpoint_list registers them; then a restore misses their weights."""
  saved, fresh = make_model(aux_loss=True), make_model(aux_loss=True)
  path = tf.train.Checkpoint(model=saved).write(str(tmp_path / "ckpt"))
  assert not all(np.array_equal(a.numpy(), b.numpy())
                 for a, b in zip(saved.trainable_variables, fresh.trainable_variables))
  tf.train.Checkpoint(model=fresh).read(path).assert_consumed()
  for a, b in zip(saved.trainable_variables, fresh.trainable_variables):
    np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
