"""--mixed_precision: every model trains, evaluates and exports with bfloat16
compute (the CPU's half type) and float32 variables, loss and served outputs."""

import dataclasses
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import small_trainer_config
from contracts import histories
from contracts import manifest as mf
from contracts.export_manifest import load_ranker_info
from trainer import config as config_lib
from trainer import export, input_pipeline, precision, ranking_eval, train_lib
from trainer.losses import CatalogueSoftmaxLoss, InBatchSoftmaxLoss, SampledSoftmaxLoss

# The data each model trains on (conftest fixtures): windows exercise the
# all-position loss, tiny_ranking is the ranker's.
MODEL_DATA = {"sasrec": "tiny_windows", "gru4rec": "tiny_windows", "two_tower": "tiny_data",
              "dien": "tiny_ranking"}
# bfloat16 keeps 8 significant bits (relative rounding 2**-9 = 0.002 per op);
# a few layers of it move a unit vector's entries by a few hundredths at most.
VECTOR_ATOL = 0.05


def mixed_config(model, manifest, model_dir, **overrides):
  extra = dict(emb_dim=8, gru_units=8, mlp_units=(16,), batch_size=32,
               rank_eval_topk=(5, 10)) if model == "dien" else {}
  return small_trainer_config(manifest.data_dir, model_dir, model=model, mixed_precision=True,
                              **{**extra, **overrides})


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16, tf.float32])
def test_large_negative_is_finite_in_the_dtype_and_softmaxes_to_zero(dtype):
  value = precision.large_negative(dtype)
  # One real logit and two masked ones: weights (1, 0, 0). A fully masked row
  # (a query at a padding position) stays finite: uniform weights, not NaN.
  logits = tf.constant([[3.0, value, value], [value, value, value]], dtype)
  assert np.isfinite(logits.numpy().astype(np.float32)).all()
  weights = tf.nn.softmax(tf.cast(logits, tf.float32)).numpy()
  np.testing.assert_allclose(weights, [[1, 0, 0], [1 / 3, 1 / 3, 1 / 3]], atol=1e-6)
  # Room to subtract another logit (a logQ correction) without overflowing.
  assert np.isfinite((logits - tf.constant(1000.0, dtype)).numpy().astype(np.float32)).all()


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_losses_of_half_inputs_are_float32_and_equal_the_float32_loss(dtype):
  """Every loss casts its inputs to float32: half-precision vectors give the
  loss of the same (rounded) vectors in float32, finite, with masked entries
  (accidental hits, padding rows, the symmetric direction's labels)."""
  rng = np.random.default_rng(0)
  n, d, num_items = 6, 4, 9
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
  query = tf.constant(unit(rng.normal(size=(n, d))), dtype)
  items = tf.constant(unit(rng.normal(size=(num_items, d))), dtype)
  ids = tf.constant([1, 2, 2, 3, 4, 5], tf.int32)  # 2 twice: an accidental hit
  weights = tf.constant([1, 1, 1, 1, 1, 0], tf.float32)  # the last row is padding
  log_q = tf.constant(np.log(np.full(n, 0.1)), tf.float32)
  sample = tf.constant([2, 6, 7], tf.int32)
  sample_log_q = tf.constant(np.log(np.full(3, 3 / 8)), tf.float32)
  in_batch = InBatchSoftmaxLoss(0.1, symmetric=True)
  losses = {
      "in_batch": lambda q, v: in_batch(q, tf.gather(v, ids), ids, weights, log_q),
      "softmax": lambda q, v: CatalogueSoftmaxLoss(0.1)(q, v, ids, weights),
      "sampled_softmax": lambda q, v: SampledSoftmaxLoss(0.1)(
          q, tf.gather(v, ids), ids, weights, tf.gather(v, sample), sample, log_q[:n],
          sample_log_q)}
  for name, loss in losses.items():
    half = loss(query, items)
    full = loss(tf.cast(query, tf.float32), tf.cast(items, tf.float32))
    assert half.dtype == tf.float32, name
    assert np.isfinite(half.numpy()) and half.numpy() > 0, name
    np.testing.assert_allclose(half.numpy(), full.numpy(), rtol=1e-6, err_msg=name)


def one_batch_loss(trainer, manifest):
  reader = input_pipeline.TrainReader(manifest, trainer.config.batch_size, 1,
                                      trainer.steps_per_epoch)
  batch = next(iter(reader()))
  return trainer.task.loss(trainer.task.forward(batch, training=True, step=0), 0)


def reference_model(config, manifest, model_dir):
  """The float32 model with the latest checkpoint's weights."""
  model = train_lib.build_model(dataclasses.replace(config, mixed_precision=False), manifest)
  latest = tf.train.latest_checkpoint(str(model_dir / "checkpoints"))
  tf.train.Checkpoint(model=model).read(latest).expect_partial() \
      .assert_existing_objects_matched()
  return model


@pytest.mark.parametrize("model", list(MODEL_DATA))
@pytest.mark.slow
def test_model_trains_evaluates_and_exports_under_mixed_precision(request, tmp_path, model):
  manifest = request.getfixturevalue(MODEL_DATA[model])
  model_dir = tmp_path / "m"
  config = mixed_config(model, manifest, model_dir)
  trainer = train_lib.Trainer(config, manifest)
  assert trainer.model.item_embedding.compute_dtype == "bfloat16"
  assert {v.dtype for v in trainer.model.variables if "float" in v.dtype} == {"float32"}
  # The policy was the model's only: the process-wide one is float32 again.
  assert keras.mixed_precision.global_policy().name == "float32"
  loss = one_batch_loss(trainer, manifest)
  assert loss.dtype == tf.float32 and np.isfinite(loss.numpy()) and loss.numpy() > 0

  result = trainer.run()
  assert result.global_step == config.train_steps
  metrics = json.loads((model_dir / "metrics.json").read_text())
  headline_metric = "auc" if model == "dien" else "ndcg@10"
  assert np.isfinite(metrics[headline_metric])

  reference = reference_model(config, manifest, model_dir)
  assert reference.item_embedding.compute_dtype == "float32"
  if model == "dien":
    info = load_ranker_info(model_dir)
    served = tf.saved_model.load(str(model_dir / export.EXPORT_DIR / info.ranker))
    batch = next(iter(ranking_eval.RankingEvaluator(manifest, (5,), 64)._dataset()))
    out = served.signatures["serving_default"](
        user=tf.cast(batch["user"], tf.int64), history=tf.cast(batch["history"], tf.int64),
        candidate=tf.cast(batch["candidate"], tf.int64), dense=batch["dense"])
    assert out["score"].dtype == tf.float32 and out["logit"].dtype == tf.float32
    expected = reference.forward(batch)[0].numpy()
    np.testing.assert_allclose(out["logit"].numpy(), expected, atol=VECTOR_ATOL * 4)
    return

  # The served user vectors: float32, unit length, close to the float32 model's.
  queries = histories.load_queries(manifest, "valid")
  history = queries.last_items(manifest.max_seq_len)[0][:20].astype(np.int64)
  users = queries.user[:20].astype(np.int64)
  tower = tf.saved_model.load(str(model_dir / export.EXPORT_DIR / export.USER_TOWER))
  served = tower.signatures["serving_default"](history=tf.constant(history),
                                               user=tf.constant(users))["vector"]
  assert served.dtype == tf.float32
  np.testing.assert_allclose(np.linalg.norm(served.numpy(), axis=1), 1.0, rtol=1e-5)
  expected = reference.user_vector(tf.constant(history, tf.int32),
                                   tf.constant(users, tf.int32)).numpy()
  np.testing.assert_allclose(served.numpy(), expected, atol=VECTOR_ATOL)
  # The raw-id signature: the same float32 vectors.
  raw = tower.signatures[export.RAW_RAGGED_SIGNATURE](
      history_values=tf.constant(np.zeros([0], np.int64)),
      history_row_lengths=tf.constant([0], tf.int64), user=tf.constant([0], tf.int64))
  assert raw["vector"].dtype == tf.float32
  items = np.load(model_dir / export.EXPORT_DIR / export.ITEM_EMBEDDINGS)
  assert items.dtype == np.float32
  expected_items = reference.item_vectors(tf.range(1, items.shape[0])).numpy()
  np.testing.assert_allclose(items[1:], expected_items, atol=VECTOR_ATOL)

  # --mode=eval on the mixed-precision model directory: the final evaluation again.
  given = dataclasses.replace(config, mode="eval", eval_checkpoint="latest")
  evaluation_config = config_lib.for_evaluation(given, {"mode", "eval_checkpoint"})
  assert evaluation_config.mixed_precision
  evaluated = json.loads(train_lib.run_evaluation(evaluation_config,
                                                  config_lib.validate(evaluation_config)))
  assert evaluated["ndcg@10"] == pytest.approx(metrics["ndcg@10"], abs=1e-6)


@pytest.mark.slow
def test_mixed_precision_under_mirrored_on_two_cpus(tiny_windows, tmp_path):
  """In-batch negatives gathered across the 2 replicas, then the sampled softmax."""
  for loss in ("in_batch", "sampled_softmax"):
    config = mixed_config("sasrec", tiny_windows, tmp_path / loss, strategy="mirrored",
                          num_cpu_replicas=2, loss=loss, num_sampled=20, export=False)
    result = train_lib.train(config, tiny_windows)
    assert result.global_step == config.train_steps
    assert np.isfinite(result.metrics["ndcg@10"])
    losses = train_lib.train_scalars(tmp_path / loss, "loss")
    assert losses and all(np.isfinite(v) and v > 0 for v in losses.values())


@pytest.mark.slow
def test_float16_policy_trains_with_loss_scaling(tiny_windows, tmp_path, monkeypatch):
  """A GPU's policy, mixed_float16, forced on the CPU: the optimizer scales
  the loss, and masking stays finite where -1e9 would be -inf in float16."""
  monkeypatch.setattr(precision, "policy_name", lambda mixed: precision.MIXED_FLOAT16
                      if mixed else precision.FLOAT32)
  config = mixed_config("sasrec", tiny_windows, tmp_path / "m", loss="in_batch", export=False)
  trainer = train_lib.Trainer(config, tiny_windows)
  assert isinstance(trainer.optimizer, keras.optimizers.LossScaleOptimizer)
  assert trainer.model.item_embedding.compute_dtype == "float16"
  result = trainer.run()
  assert result.global_step == config.train_steps
  assert np.isfinite(result.metrics["ndcg@10"])
  losses = train_lib.train_scalars(tmp_path / "m", "loss")
  assert losses and all(np.isfinite(v) and v > 0 for v in losses.values())
