"""trainer --model=dien on ranking data made by the real chain (tiny_ranking fixture)."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from conftest import small_trainer_config
from contracts import manifest as mf
from contracts.export_manifest import load_ranker_info
from contracts.vocab import Vocabulary
from trainer import config as config_lib
from trainer import export, ranking_eval, train_lib


def dien_config(data, model_dir, **overrides):
  return small_trainer_config(data.data_dir, model_dir, model="dien", emb_dim=8, gru_units=8,
                              mlp_units=(16,), batch_size=32, rank_eval_topk=(5, 10),
                              **overrides)


def weights_of(trainer):
  return [v.numpy() for v in trainer.model.trainable_variables]


# XLA for the variant with the most graph (the binary's default is jit_compile).
@pytest.mark.parametrize("evolution,aux,jit", [("aigru", 0.0, False), ("augru", 1.0, True)])
@pytest.mark.slow
def test_one_dien_step_changes_weights(tiny_ranking, tmp_path, evolution, aux, jit):
  config = dien_config(tiny_ranking, tmp_path / "m", evolution=evolution, aux_loss_weight=aux,
                       train_steps=1, steps_per_loop=1, export=False, jit_compile=jit)
  trainer = train_lib.Trainer(config, tiny_ranking)
  before = weights_of(trainer)
  dataset = trainer.strategy.distribute_datasets_from_function(
      train_lib.input_pipeline.TrainReader(tiny_ranking, 32, 1, trainer.steps_per_epoch))
  loss = float(trainer._train_loop_function()(iter(dataset), tf.constant(1)))
  # BCE of a fresh model is about log 2 per example (+ the auxiliary loss).
  assert 0.3 < loss < (3.0 if aux else 1.5)
  changed = [not np.array_equal(a, b) for a, b in zip(before, weights_of(trainer))]
  assert sum(changed) >= len(changed) - 2  # user/item rows not in the batch may stay


@pytest.mark.slow
def test_dien_resume_equals_an_uninterrupted_run(tiny_ranking, tmp_path):
  straight = train_lib.Trainer(dien_config(tiny_ranking, tmp_path / "a", train_steps=4,
                                           export=False), tiny_ranking)
  straight.run()
  first = train_lib.Trainer(dien_config(tiny_ranking, tmp_path / "b", train_steps=2,
                                        export=False), tiny_ranking)
  first.run()
  resumed = train_lib.Trainer(dien_config(tiny_ranking, tmp_path / "b", train_steps=4,
                                          export=False), tiny_ranking)
  assert resumed.restore() == 2
  resumed.run()
  for a, b in zip(weights_of(straight), weights_of(resumed)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_dien_trains_evaluates_reranks_and_exports(tiny_ranking, tmp_path):
  model_dir = tmp_path / "m"
  result = train_lib.train(dien_config(tiny_ranking, model_dir, train_steps=6), tiny_ranking)
  metrics = json.loads((model_dir / "metrics.json").read_text())
  assert metrics["model"] == "dien" and metrics["global_step"] == 6
  for key in ("auc", "gauc", "logloss", "ndcg@5", "hit_rate@5", "retrieval_ndcg@5"):
    assert np.isfinite(metrics[key]), key
  assert metrics["examples"] == tiny_ranking.counts["examples_eval"]
  assert "AUC" in result.headline and "NDCG@5" in result.headline

  # The reranked lists: every eval candidate once, ranks 1..n per user by rank_score.
  reranked = pd.read_parquet(model_dir / ranking_eval.RERANKED_FILE)
  assert len(reranked) == tiny_ranking.counts["examples_eval"]
  assert not reranked.duplicated(["user_id", "item_id"]).any()
  for _, group in list(reranked.groupby("user_id"))[:20]:
    assert group["rank"].tolist() == list(range(1, len(group) + 1))
    assert (np.diff(group["rank_score"].to_numpy()) <= 0).all()
  # Metrics of the written lists agree with metrics.json.
  first = reranked[reranked["label"] == 1]
  hr5 = (first["rank"] <= 5).sum() / reranked["user_id"].nunique()
  assert hr5 == pytest.approx(metrics["hit_rate@5"])

  # The SavedModel scores like the trained model, from raw features.
  info = load_ranker_info(model_dir)
  assert info.dense_features == mf.DENSE_FEATURES
  served = tf.saved_model.load(str(model_dir / export.EXPORT_DIR / info.ranker))
  evaluator = ranking_eval.RankingEvaluator(tiny_ranking, (5,), 64)
  batch = next(iter(evaluator._dataset()))
  out = served.signatures["serving_default"](
      user=tf.cast(batch["user"], tf.int64), history=tf.cast(batch["history"], tf.int64),
      candidate=tf.cast(batch["candidate"], tf.int64), dense=batch["dense"])
  rows = reranked.set_index(["user_id", "item_id"])
  users = Vocabulary.from_parquet(tiny_ranking.path(mf.USERS_FILE), "user_id")
  items = Vocabulary.from_parquet(tiny_ranking.path(mf.ITEMS_FILE), "item_id")
  keys = list(zip(users.to_raw(batch["user"].numpy()), items.to_raw(batch["candidate"].numpy())))
  np.testing.assert_allclose(out["score"].numpy(), rows.loc[keys, "rank_score"].to_numpy(),
                             rtol=1e-4, atol=1e-6)


def test_dien_refuses_sequence_data_and_retrieval_models_refuse_ranking_data(
    tiny_data, tiny_ranking, tmp_path):
  with pytest.raises(config_lib.ConfigError, match="--model=dien|mode=ranking"):
    config_lib.validate(dien_config(tiny_data, tmp_path / "a"))
  with pytest.raises(config_lib.ConfigError, match="--model=dien"):
    config_lib.validate(small_trainer_config(tiny_ranking.data_dir, tmp_path / "b"))


@pytest.mark.slow
def test_dien_binary_prints_the_reranking_headline(tiny_ranking, tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "trainer.main", "--model=dien", f"--data_dir={tiny_ranking.data_dir}",
       f"--model_dir={tmp_path / 'm'}", "--train_steps=2", "--batch_size=32", "--emb_dim=8",
       "--gru_units=8", "--mlp_units=16", "--evolution=augru", "--aux_loss_weight=0.5",
       "--nojit_compile", "--log_every_steps=1", "--steps_per_loop=1"],
      capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "trainer: step 2, eval AUC" in result.stdout
  assert (tmp_path / "m" / "export" / "ranker" / "saved_model.pb").exists()


@pytest.mark.slow
def test_dien_trains_under_mirrored_on_two_cpus(tiny_ranking, tmp_path):
  config = dien_config(tiny_ranking, tmp_path / "m", strategy="mirrored", num_cpu_replicas=2,
                       train_steps=2, export=False)
  result = train_lib.train(config, tiny_ranking)
  assert result.global_step == 2
  assert np.isfinite(result.metrics["auc"]) and result.metrics["num_users"] > 0
