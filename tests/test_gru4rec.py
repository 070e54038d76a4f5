"""GRU4Rec: the recurrent retrieval model, through the same trainer, export and retrieval."""

import numpy as np
import pytest
import tensorflow as tf

from conftest import small_trainer_config
from contracts import histories
from retrieval import job
from trainer import export, models, train_lib
from trainer.config import TrainerConfig
from trainer.gru4rec import GRU4Rec

DATA = models.DataSpec(num_items=20, num_users=5, num_categories=1, max_seq_len=6,
                       item_category=np.zeros(20, np.int32))
NO_USER = tf.zeros([2], tf.int32)


def tiny_model(**overrides) -> GRU4Rec:
  config = TrainerConfig(**{"model": "gru4rec", "emb_dim": 8, "num_blocks": 2, "dropout": 0.0,
                            "item_dropout": 0.0, **overrides})
  return models.build(GRU4Rec, config, DATA)


def test_left_padding_is_skipped_and_each_query_sees_only_its_past():
  model = tiny_model()
  padded = model.query_sequence(tf.constant([[0, 0, 0, 3, 4, 5], [0, 0, 0, 3, 4, 9]]),
                                NO_USER).numpy()
  unpadded = model.query_sequence(tf.constant([[3, 4, 5]]), NO_USER[:1]).numpy()
  # The GRU starts from its zero state at the first real click, whatever padding precedes it.
  np.testing.assert_allclose(padded[0, 3:], unpadded[0], atol=1e-6)
  assert not padded[0, :3].any()  # padding positions are no query
  # Row 2 differs from row 1 in its last click only: the earlier queries are equal.
  np.testing.assert_allclose(padded[0, :5], padded[1, :5], atol=1e-6)
  assert np.abs(padded[0, 5] - padded[1, 5]).max() > 1e-4
  np.testing.assert_allclose(np.linalg.norm(padded[:, 3:], axis=-1), 1.0, rtol=1e-5)


def test_shared_embeddings_score_against_the_input_item_embeddings():
  shared, heads = tiny_model(), tiny_model(share_item_embeddings=False)
  items = tf.constant([1, 2, 7])
  table = shared.item_embedding(items).numpy()
  expected = table / np.linalg.norm(table, axis=-1, keepdims=True)
  np.testing.assert_allclose(shared.item_vectors(items).numpy(), expected, rtol=1e-5)
  assert any("item_head" in v.path for v in heads.trainable_variables)
  assert not any("head" in v.path for v in shared.trainable_variables)


def test_a_model_only_checkpoint_restores_every_gru_layer(tmp_path):
  saved, fresh = tiny_model(seed=1), tiny_model(seed=2)
  path = tf.train.Checkpoint(model=saved).write(str(tmp_path / "ckpt"))
  tf.train.Checkpoint(model=fresh).read(path).assert_consumed()
  assert sum("gru_1" in v.path for v in fresh.trainable_variables) == 3
  for a, b in zip(saved.trainable_variables, fresh.trainable_variables):
    np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)



def test_jit_compile_trains_the_unrolled_gru_with_the_same_gradients():
  """--jit_compile: the trainer XLA-compiles the forward pass and takes its
  gradient outside (train_lib). The GRU's while loop cannot cross that
  boundary; the unrolled GRU gives the while loop's gradients, same weights."""
  looped, unrolled = tiny_model(seed=3, jit_compile=False), tiny_model(seed=3, jit_compile=True)
  for copy, original in zip(unrolled.weights, looped.weights, strict=True):
    copy.assign(original)
  history = tf.constant([[0, 0, 0, 3, 4, 5], [0, 1, 2, 3, 4, 9]])

  def gradients(model, jit_compile):
    forward = tf.function(lambda h: model.query_sequence(h, NO_USER, training=True)[:, -1, :1],
                          jit_compile=jit_compile)

    @tf.function
    def step(history):
      with tf.GradientTape() as tape:
        loss = tf.reduce_sum(forward(history))
      return tape.gradient(loss, model.trainable_variables)
    return [tf.convert_to_tensor(g).numpy() for g in step(history)]

  with pytest.raises(tf.errors.UnimplementedError, match="TensorList"):
    gradients(looped, jit_compile=True)
  for got, want in zip(gradients(unrolled, jit_compile=True),
                       gradients(looped, jit_compile=False)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

@pytest.mark.slow
def test_trains_selects_exports_and_the_retrieval_job_reproduces_its_metrics(tiny_windows,
                                                                              tmp_path):
  config = small_trainer_config(tiny_windows.data_dir, tmp_path / "m", model="gru4rec",
                                train_steps=6, eval_every_steps=3,
                                early_stopping_metric="ndcg@10", early_stopping_patience=0,
                                jit_compile=None)  # the registry's choice
  result = train_lib.train(config, tiny_windows)
  assert np.isfinite(result.metrics["by_split"]["test"]["ndcg@10"])
  assert result.metrics["selection"]["best_step"] in (3, 6)
  info = export.load_info(tmp_path / "m")
  assert info.model == "gru4rec"
  # The exported user tower is the model's last-position query.
  queries = histories.load_queries(tiny_windows, "valid")
  history = queries.last_items(tiny_windows.max_seq_len)[0][:8].astype(np.int64)
  loaded = tf.saved_model.load(str(tmp_path / "m" / "export" / export.USER_TOWER))
  served = loaded.signatures["serving_default"](
      history=tf.constant(history), user=tf.constant(queries.user[:8]))["vector"].numpy()
  assert served.shape == (8, 16)
  np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, rtol=1e-5)
  out = job.run(job.RetrievalConfig(data_dir=str(tiny_windows.data_dir),
                                    model_dir=str(tmp_path / "m"),
                                    output_dir=str(tmp_path / "candidates"), topk=10,
                                    eval_topk=(10,), eval_split="valid"))
  assert out["ndcg@10"] == pytest.approx(result.metrics["by_split"]["valid"]["ndcg@10"],
                                         abs=1e-6)
