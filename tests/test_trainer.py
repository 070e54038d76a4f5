"""The training library in-process: steps, strategies, resume, NaN, export, eval."""

import json

import numpy as np
import pytest
import tensorflow as tf

from conftest import small_trainer_config
from contracts import histories
from contracts import metrics
from trainer import evaluation, export, train_lib
from trainer import task as task_lib


def weights_of(trainer):
  return [v.numpy() for v in trainer.model.trainable_variables]


@pytest.mark.parametrize("model", ["sasrec", "two_tower"])
@pytest.mark.parametrize("data", ["tiny_data", "tiny_windows"])
@pytest.mark.slow
def test_one_training_step_per_model_changes_weights_and_loss_is_finite(
    request, tmp_path, model, data):
  manifest = request.getfixturevalue(data)
  config = small_trainer_config(manifest.data_dir, tmp_path / "m", model=model, train_steps=1,
                                steps_per_loop=1, export=False)
  trainer = train_lib.Trainer(config, manifest)
  before = weights_of(trainer)
  loop = trainer._train_loop_function()
  dataset = trainer.strategy.distribute_datasets_from_function(
      train_lib.input_pipeline.TrainReader(manifest, 16, 1, trainer.steps_per_epoch))
  loss = float(loop(iter(dataset), tf.constant(1)))
  assert np.isfinite(loss) and loss > 0
  changed = [not np.array_equal(a, b) for a, b in zip(before, weights_of(trainer))]
  assert sum(changed) >= len(changed) - 1  # position embeddings etc. all move
  assert int(trainer.optimizer.iterations.numpy()) == 1


@pytest.mark.slow
def test_weight_decay_shrinks_kernels_and_embeddings_but_not_biases_or_layer_norm(
    tiny_windows, tmp_path):
  """One step with and without --weight_decay from the same initial weights.

  The gradients of step 1 are the same in both runs, so (AdamW) a decayed
  variable ends at no_decay - rate * decay * initial and an excluded one
  (bias, LayerNorm gamma/beta) ends equal. With rate 1e-2 (warm-up 1) and
  decay 5 the difference is 5% of each initial weight.
  """
  rate, decay = 1e-2, 5.0
  after, initial = {}, None
  for weight_decay in (0.0, decay):
    config = small_trainer_config(tiny_windows.data_dir, tmp_path / f"m{weight_decay}",
                                  train_steps=1, steps_per_loop=1, learning_rate=rate,
                                  lr_schedule="constant", weight_decay=weight_decay,
                                  export=False)
    trainer = train_lib.Trainer(config, tiny_windows)
    variables = trainer.model.trainable_variables
    names = [v.name for v in variables]  # paths carry per-instance Keras counters
    start = [v.numpy() for v in variables]
    if initial is None:
      initial = start
    assert all(np.array_equal(a, b) for a, b in zip(initial, start))  # same seed, same init
    dataset = trainer.strategy.distribute_datasets_from_function(
        train_lib.input_pipeline.TrainReader(tiny_windows, 16, 1, trainer.steps_per_epoch))
    trainer._train_loop_function()(iter(dataset), tf.constant(1))
    after[weight_decay] = [v.numpy() for v in variables]
  decayed = 0
  for name, before, plain, with_decay in zip(names, initial, after[0.0], after[decay]):
    if name in train_lib.NO_WEIGHT_DECAY:
      np.testing.assert_array_equal(with_decay, plain, err_msg=name)
    else:
      np.testing.assert_allclose(with_decay, plain - rate * decay * before, atol=1e-6,
                                 err_msg=name)
      decayed += 1
  assert decayed >= 6  # embeddings, attention, feed-forward and head kernels


@pytest.mark.parametrize("loss", ["in_batch", "softmax", "sampled_softmax"])
@pytest.mark.slow
def test_all_positions_loss_uses_every_real_position(tiny_windows, tmp_path, loss):
  config = small_trainer_config(tiny_windows.data_dir, tmp_path / "m", loss=loss, num_sampled=40)
  trainer = train_lib.Trainer(config, tiny_windows)
  assert trainer.task.all_positions
  assert trainer.task.catalogue_softmax == (loss == "softmax")
  batch = next(iter(train_lib.input_pipeline.TrainReader(tiny_windows, 16, 1,
                                                         trainer.steps_per_epoch)()))
  outputs = trainer.task.forward(batch)
  rows = 16 * tiny_windows.max_seq_len
  assert outputs["queries"].shape[0] == rows
  assert float(tf.reduce_sum(outputs["weights"])) == float(tf.reduce_sum(batch["length"]))
  # The catalogue softmax scores every item; the in-batch loss one candidate per
  # row; the sampled softmax one per row and the step's 40 catalogue items.
  expected = tiny_windows.vocab_sizes["items"] if loss == "softmax" else rows
  assert outputs["item_vectors"].shape[0] == expected
  if loss == "sampled_softmax":
    assert outputs["sample_vectors"].shape[0] == 40 and outputs["sample"].numpy().min() >= 1
    again = trainer.task.forward(batch)["sample"].numpy()
    np.testing.assert_array_equal(again, outputs["sample"].numpy())  # a function of the step
    assert not np.array_equal(trainer.task.forward(batch, step=1)["sample"].numpy(), again)
  assert np.isfinite(float(trainer.task.loss(outputs)))


@pytest.mark.parametrize("loss", ["softmax", "sampled_softmax"])
@pytest.mark.slow
def test_resume_equals_an_uninterrupted_run(tiny_windows, tmp_path, loss):
  """6 steps in one run == 3 steps, a new process state, then 3 more (dropout on)."""
  # The interruption is a 3-step run, so the schedule must not depend on the
  # run's length (cosine would decay over 3 steps); dropout checks the masks,
  # the sampled softmax its per-step sample.
  same = dict(lr_schedule="constant", dropout=0.2, export=False, loss=loss, num_sampled=30)
  straight = train_lib.Trainer(
      small_trainer_config(tiny_windows.data_dir, tmp_path / "a", train_steps=6, **same),
      tiny_windows)
  straight.run()
  first = train_lib.Trainer(
      small_trainer_config(tiny_windows.data_dir, tmp_path / "b", train_steps=3,
                           steps_per_loop=1, **same), tiny_windows)
  first.run()
  resumed = train_lib.Trainer(
      small_trainer_config(tiny_windows.data_dir, tmp_path / "b", train_steps=6, **same),
      tiny_windows)
  assert resumed.restore() == 3
  result = resumed.run()
  assert result.global_step == 6
  for a, b in zip(weights_of(straight), weights_of(resumed)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss", ["in_batch", "softmax", "sampled_softmax"])
@pytest.mark.slow
def test_mirrored_on_two_cpus_trains_checkpoints_and_evaluates(tiny_windows, tmp_path, loss):
  # jit_compile as the binary's default: the gathered loss must still run.
  config = small_trainer_config(tiny_windows.data_dir, tmp_path / "m", strategy="mirrored",
                                num_cpu_replicas=2, train_steps=4, export=False,
                                jit_compile=True, loss=loss, num_sampled=30)
  trainer = train_lib.Trainer(config, tiny_windows)
  assert trainer.strategy.num_replicas_in_sync == 2
  result = trainer.run()
  assert result.global_step == 4
  assert tf.train.latest_checkpoint(str(tmp_path / "m" / "checkpoints")).endswith("-4")
  saved = json.loads((tmp_path / "m" / "metrics.json").read_text())
  assert saved["global_step"] == 4 and 0 <= saved["hit_rate@10"] <= 1
  # The end evaluates every held-out split; the headline split is the top level.
  assert sorted(saved["by_split"]) == ["test", "valid"]
  assert saved["by_split"]["valid"]["hit_rate@10"] == saved["hit_rate@10"]
  assert saved["by_split"]["test"]["split"] == "test" and saved["train_seconds"] > 0


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_windows, tmp_path, monkeypatch):
  original = task_lib.RetrievalTask.loss

  def poisoned(self, outputs, step=0):
    loss = original(self, outputs, step)
    # From step 3 on (iterations >= 2) the reported loss is NaN; a constant
    # term keeps the gradients finite (tf.where would leak NaN into them).
    return loss + tf.where(tf.cast(step, tf.int64) >= 2, np.nan, 0.0)

  monkeypatch.setattr(task_lib.RetrievalTask, "loss", poisoned)
  config = small_trainer_config(tiny_windows.data_dir, tmp_path / "m", train_steps=8)
  with pytest.raises(train_lib.TrainingError, match=r"loss is nan in steps 3-4; .*ckpt-2"):
    train_lib.Trainer(config, tiny_windows).run()
  assert tf.train.latest_checkpoint(str(tmp_path / "m" / "checkpoints")).endswith("-2")
  assert not (tmp_path / "m" / "metrics.json").exists()


@pytest.mark.parametrize("model", ["sasrec", "two_tower"])
def test_a_model_only_checkpoint_restores_every_weight(tiny_windows, tmp_path, model):
  """Keras 3 hides list attributes (sasrec's blocks, the towers) from
  tf.train.Checkpoint unless models.checkpoint_list registers them."""
  saved, fresh = (train_lib.Trainer(small_trainer_config(
      tiny_windows.data_dir, tmp_path / name, model=model, seed=seed), tiny_windows).model
      for name, seed in (("a", 1), ("b", 2)))
  path = tf.train.Checkpoint(model=saved).write(str(tmp_path / "ckpt"))
  tf.train.Checkpoint(model=fresh).read(path).assert_consumed()
  for a, b in zip(saved.trainable_variables, fresh.trainable_variables):
    np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


@pytest.mark.parametrize("model", ["sasrec", "two_tower"])
@pytest.mark.slow
def test_saved_model_reload_gives_the_same_user_vectors(tiny_windows, tmp_path, model):
  config = small_trainer_config(tiny_windows.data_dir, tmp_path / "m", model=model,
                                train_steps=2)
  trainer = train_lib.Trainer(config, tiny_windows)
  trainer.run()
  info = export.load_info(tmp_path / "m")
  assert (info.model, info.emb_dim, info.max_seq_len) == (model, 16, tiny_windows.max_seq_len)
  assert info.data_fingerprint == export.data_fingerprint(tiny_windows)
  queries = histories.load_queries(tiny_windows, "valid")
  history = queries.last_items(tiny_windows.max_seq_len)[0][:20].astype(np.int64)
  users = queries.user[:20]
  loaded = tf.saved_model.load(str(tmp_path / "m" / "export" / export.USER_TOWER))
  served = loaded.signatures["serving_default"](history=tf.constant(history),
                                                user=tf.constant(users))["vector"].numpy()
  direct = trainer.model.user_vector(tf.constant(history, tf.int32),
                                     tf.constant(users, tf.int32)).numpy()
  np.testing.assert_allclose(served, direct, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, rtol=1e-5)
  # user_vector's shortcut (last position only) is the last training query.
  every_position = trainer.model.query_sequence(tf.constant(history, tf.int32),
                                                tf.constant(users, tf.int32)).numpy()
  np.testing.assert_allclose(direct, every_position[:, -1], rtol=1e-5, atol=1e-6)
  items = np.load(tmp_path / "m" / "export" / export.ITEM_EMBEDDINGS)
  assert items.shape == (tiny_windows.vocab_sizes["items"], 16) and not items[0].any()


def test_tf_ranks_agree_with_the_numpy_metrics_module():
  rng = np.random.default_rng(0)
  scores = rng.integers(0, 4, size=(50, 30)).astype(np.float32)  # many ties
  scores[rng.random(scores.shape) < 0.2] = -np.inf  # removed (seen) items
  targets = rng.integers(1, 30, size=50)
  expected = metrics.target_ranks(scores.copy(), targets)
  got = evaluation.target_ranks(tf.constant(scores), tf.constant(targets, tf.int32)).numpy()
  np.testing.assert_array_equal(got, expected)


def test_evaluator_on_a_model_with_known_scores(tiny_windows):
  """A fake model scoring item i as -i: the target's rank is the number of
  unseen items with a lower index, and a seen target is a miss."""

  class ScoreByIndexModel:
    def user_vector(self, history, user):
      return tf.ones([tf.shape(user)[0], 1])

    def item_vectors(self, items, training=False):
      return -tf.cast(items, tf.float32)[:, None]

  ev = evaluation.Evaluator(tiny_windows, "test", ks=(1, 5, 20), batch_size=37)
  result = ev.evaluate(ScoreByIndexModel())
  q = ev.queries
  expected = []
  for i, target in enumerate(q.target):
    seen = set(q.values[q.offsets[i]:q.offsets[i + 1]].tolist())
    expected.append(len(seen) + 10**6 if target in seen else
                    target - 1 - sum(1 for j in seen if j < target))
  expected = np.array(expected)
  for k in (1, 5, 20):
    assert result[f"hit_rate@{k}"] == pytest.approx((expected < k).mean())
  assert result["ndcg@20"] == pytest.approx(
      np.where(expected < 20, 1 / np.log2(expected + 2.0), 0).mean())
  assert result["num_users"] == len(q) and result["protocol"] == "full"


def test_sampled_negatives_protocol_ranks_among_n_items(tiny_windows):
  """With a constant score the target ranks by index among its N sampled items."""
  num_items = tiny_windows.vocab_sizes["items"]

  class ConstantModel:
    def user_vector(self, history, user):
      return tf.ones([tf.shape(user)[0], 1])

    def item_vectors(self, items, training=False):
      return tf.ones([tf.shape(items)[0], 1])

  ev = evaluation.Evaluator(tiny_windows, "valid", ks=(1, 101), negatives=100)
  result = ev.evaluate(ConstantModel())
  assert result["protocol"] == "sampled_100"
  assert result["hit_rate@101"] == pytest.approx(1 - result["targets_already_seen"] /
                                                 result["num_users"])
  assert 0 < result["hit_rate@1"] < 0.5 and num_items > 101


def test_shared_item_embeddings_and_item_dropout(tiny_windows):
  from trainer.config import TrainerConfig
  config = small_trainer_config(tiny_windows.data_dir, "", item_dropout=0.5)
  model = train_lib.build_model(config, tiny_windows)
  assert not [v.name for v in model.trainable_variables if "head" in v.path]
  items = tf.range(1, 6)
  # Shared: an item's vector is its (unit-length) input embedding.
  expected = tf.math.l2_normalize(model.item_embedding(items), axis=-1)
  np.testing.assert_allclose(model.item_vectors(items).numpy(), expected.numpy(), rtol=1e-6)
  # Item dropout only in training, as a function of the step's seed.
  seed = tf.constant([1, 2], tf.int64)
  dropped = model.item_vectors(items, training=True, seed=seed).numpy()
  assert not np.allclose(dropped, expected.numpy())
  np.testing.assert_array_equal(dropped, model.item_vectors(items, training=True,
                                                            seed=seed).numpy())
  heads = train_lib.build_model(small_trainer_config(
      tiny_windows.data_dir, "", share_item_embeddings=False, item_dropout=0.0), tiny_windows)
  assert {"query_head", "item_head"} <= {v.path.split("/")[0] for v in heads.trainable_variables}
  # A trainer_config.json from before these fields existed describes the heads model.
  legacy = TrainerConfig.from_dict({"model": "sasrec", "emb_dim": 16})
  assert (legacy.share_item_embeddings, legacy.item_dropout) == (False, 0.0)


@pytest.mark.parametrize("model", ["sasrec", "two_tower"])
@pytest.mark.slow
def test_the_serving_signatures_refuse_inputs_that_disagree(tiny_windows, tmp_path, model):
  """Rows, lengths and users that do not line up fail inside the loaded
  SavedModel instead of returning one vector per `length` entry."""
  from contracts import manifest as mf
  from contracts.vocab import Vocabulary
  config = small_trainer_config(tiny_windows.data_dir, tmp_path / "m", model=model)
  built = train_lib.Trainer(config, tiny_windows).model  # untrained weights serve as well
  export.export(built, model, tiny_windows, tmp_path / "m", 0)
  tower = tf.saved_model.load(str(tmp_path / "m" / "export" / export.USER_TOWER))
  items = Vocabulary.from_parquet(tiny_windows.path(mf.ITEMS_FILE), "item_id")
  users = Vocabulary.from_parquet(tiny_windows.path(mf.USERS_FILE), "user_id")
  ids = tf.constant(items.raw_ids[:6].reshape(3, 2))  # 3 rows of 2 raw clicks
  three_users = tf.constant(users.raw_ids[:3])
  raw = tower.signatures[export.RAW_SIGNATURE]
  ragged = tower.signatures[export.RAW_RAGGED_SIGNATURE]
  default = tower.signatures["serving_default"]
  assert raw(history=ids, length=tf.constant([2, 1, 0], tf.int64),
             user=three_users)["vector"].shape == (3, 16)

  def refused(signature, message, **inputs):
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
      signature(**inputs)

  # 3 history rows, 2 lengths: the third row used to be dropped silently.
  refused(raw, "serving_raw: `length` must have one entry per row of `history`",
          history=ids, length=tf.constant([2, 2], tf.int64), user=three_users)
  refused(raw, r"serving_raw: `length` must be <= the width of `history`",
          history=ids, length=tf.constant([2, 3, 1], tf.int64), user=three_users)
  refused(raw, r"serving_raw: `length` must be >= 0",
          history=ids, length=tf.constant([2, -1, 1], tf.int64), user=three_users)
  refused(raw, "serving_raw: `user` must have one id per row of the history",
          history=ids, length=tf.constant([2, 2, 2], tf.int64), user=three_users[:2])
  values = tf.reshape(ids, [-1])  # 6 raw clicks
  refused(ragged, "serving_raw_ragged: `history_row_lengths` must add up to the number of "
          "`history_values`", history_values=values,
          history_row_lengths=tf.constant([2, 2, 1], tf.int64), user=three_users)
  refused(ragged, "serving_raw_ragged: `history_row_lengths` must be >= 0",
          history_values=values, history_row_lengths=tf.constant([4, 3, -1], tf.int64),
          user=three_users)
  refused(ragged, "serving_raw_ragged: `user` must have one id per row",
          history_values=values, history_row_lengths=tf.constant([2, 2, 2], tf.int64),
          user=three_users[:2])
  indices = tf.constant(np.arange(1, 1 + 3 * tiny_windows.max_seq_len, dtype=np.int64)
                        .reshape(3, -1) % tiny_windows.vocab_sizes["items"])
  refused(default, "serving_default: `user` must have one id per row",
          history=indices, user=tf.constant([1, 2], tf.int64))
  # sasrec ignores the user: none at all is allowed; two_tower embeds it and needs one per row.
  no_users = tf.constant([], tf.int64)
  if model == "sasrec":
    assert default(history=indices, user=no_users)["vector"].shape == (3, 16)
  else:
    refused(default, "serving_default: `user` must have one id per row", history=indices,
            user=no_users)
