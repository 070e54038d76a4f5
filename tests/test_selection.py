"""Model selection: early stopping, the best checkpoint, --mode=eval."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from conftest import small_trainer_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import time_to_quality  # noqa: E402
from trainer import evaluation, export, selection, train_lib

ENV_FLAGS = ["--batch_size=16", "--emb_dim=16", "--num_blocks=1", "--ff_dim=16",
             "--eval_topk=5,10", "--warmup_steps=1", "--nojit_compile", "--shuffle_buffer=256",
             "--lr_schedule=constant", "--dropout=0.1"]


def entry(step, value):
  return {"step": step, "epoch": step / 10, "ndcg@10": value}


# --- the curve on its own ------------------------------------------------------

def test_a_scripted_curve_stops_after_patience_evaluations_and_keeps_the_first_best():
  # Values at steps 10..70: the best is 0.5 at step 30 (0.5 again at 50 is no
  # improvement); 40, 50, 60 do not improve, so patience 3 runs out at 60.
  chosen = selection.Selection("ndcg@10", "valid", patience=3)
  improved = [chosen.add(entry(s, v)) for s, v in
              ((10, 0.1), (20, 0.3), (30, 0.5), (40, 0.4), (50, 0.5), (60, 0.2))]
  assert improved == [True, True, True, False, False, False]
  assert chosen.best()["step"] == 30 and chosen.evaluations_since_best() == 3
  assert chosen.exhausted
  chosen.truncate(50)  # a resume from step 50 forgets step 60
  assert not chosen.exhausted and chosen.evaluations_since_best() == 2
  chosen.add(entry(60, 0.2))
  never = selection.Selection("ndcg@10", "valid", patience=0, curve=chosen.curve)
  assert never.best()["step"] == 30 and not never.exhausted  # patience 0: never stops


def test_the_curve_refuses_a_step_that_goes_back():
  chosen = selection.Selection("ndcg@10", "valid", 2, [entry(10, 0.1)])
  with pytest.raises(ValueError, match="step 10 after step 10"):
    chosen.add(entry(10, 0.2))


def test_a_saved_curve_with_another_metric_is_refused(tmp_path):
  selection.Selection("hit_rate@10", "valid", 2, [entry(10, 0.1) | {"hit_rate@10": 0.2}]).save(
      tmp_path)
  with pytest.raises(selection.DataError, match="selects on valid hit_rate@10, not valid ndcg@10"):
    selection.load(tmp_path, "ndcg@10", "valid", 2, restored_step=10)
  assert selection.load(tmp_path, "hit_rate@10", "valid", 2, 5).curve == []


# --- the training loop -----------------------------------------------------------

def scripted_evaluations(monkeypatch, values):
  """Periodic (valid) evaluations return `values` in turn, as ndcg@10."""
  original = evaluation.Evaluator.evaluate
  calls = iter(values)

  def evaluate(self, model, reranked_dir=None):
    result = original(self, model, reranked_dir)
    if self.split == "valid" and self.max_users:  # the periodic (sampled) evaluations
      result["ndcg@10"] = next(calls)
    return result

  monkeypatch.setattr(evaluation.Evaluator, "evaluate", evaluate)


@pytest.mark.slow
def test_early_stopping_on_a_scripted_sequence_restores_and_exports_the_best_step(
    tiny_windows, tmp_path, monkeypatch):
  # Evaluations every 2 steps score 0.1, 0.4, 0.3, 0.2, 0.35: the best is step
  # 4; with patience 3 the run stops at step 10 of 40.
  scripted_evaluations(monkeypatch, [0.1, 0.4, 0.3, 0.2, 0.35])
  config = small_trainer_config(tiny_windows.data_dir, tmp_path / "m", train_steps=40,
                                early_stopping_metric="ndcg@10", early_stopping_patience=3,
                                eval_every_steps=2, eval_max_users=50, checkpoint_every_steps=100,
                                lr_schedule="constant")
  trainer = train_lib.Trainer(config, tiny_windows)
  result = trainer.run()
  assert result.global_step == 10
  saved = json.loads((tmp_path / "m" / "metrics.json").read_text())
  assert saved["global_step"] == 4 and saved["trained_steps"] == 10
  chosen = saved["selection"]
  assert (chosen["best_step"], chosen["best_value"], chosen["stopped_early"]) == (4, 0.4, True)
  assert [e["step"] for e in chosen["curve"]] == [2, 4, 6, 8, 10]
  best = json.loads((tmp_path / "m" / "checkpoints" / "best" / "best.json").read_text())
  assert (best["step"], best["metric"], best["value"]) == (4, "ndcg@10", 0.4)
  assert sorted(p.name for p in (tmp_path / "m" / "checkpoints" / "best").iterdir()) == \
      ["best.json", "ckpt-4.data-00000-of-00001", "ckpt-4.index"]
  # The export holds the best step's item vectors, not the last step's.
  exported = np.load(tmp_path / "m" / "export" / export.ITEM_EMBEDDINGS)
  assert export.load_info(tmp_path / "m").global_step == 4

  def item_vectors(prefix):
    model = train_lib.build_model(config, tiny_windows)
    tf.train.Checkpoint(model=model).read(str(prefix)).expect_partial()
    vectors = model.item_vectors(tf.range(tiny_windows.vocab_sizes["items"])).numpy()
    vectors[0] = 0
    return vectors

  np.testing.assert_array_equal(exported, item_vectors(tmp_path / "m/checkpoints/best/ckpt-4"))
  last = item_vectors(tf.train.latest_checkpoint(str(tmp_path / "m" / "checkpoints")))
  assert tf.train.latest_checkpoint(str(tmp_path / "m" / "checkpoints")).endswith("-10")
  assert not np.allclose(exported, last)

  # A re-run of the same command trains no further and takes the same choice.
  again = train_lib.Trainer(config, tiny_windows).run()
  assert again.global_step == 10 and again.metrics["global_step"] == 4


@pytest.mark.slow
def test_mode_eval_reproduces_the_final_metrics_and_writes_only_its_file(tiny_windows,
                                                                         tmp_path):
  model_dir = tmp_path / "m"
  config = small_trainer_config(tiny_windows.data_dir, model_dir, train_steps=12,
                                early_stopping_metric="ndcg@10", early_stopping_patience=0,
                                eval_every_steps=4, export=False)
  train_lib.Trainer(config, tiny_windows).run()
  trained = json.loads((model_dir / "metrics.json").read_text())
  # tools/time_to_quality.py reads the same curve back from the summaries.
  curve, reached = time_to_quality.minutes_to_quality(str(model_dir), "ndcg@10")
  assert [step for _, step, _ in curve] == [e["step"] for e in trained["selection"]["curve"]]
  assert [value for _, _, value in curve] == pytest.approx(  # summaries are float32
      [e["ndcg@10"] for e in trained["selection"]["curve"]], rel=1e-6)
  assert 0 <= reached[0.9] <= reached[0.95] <= reached[1.0]
  before = sorted(str(p) for p in model_dir.rglob("*"))
  out = tmp_path / "eval.json"
  result = subprocess.run([sys.executable, "-m", "trainer.main", "--mode=eval",
                           f"--model_dir={model_dir}", f"--eval_metrics_file={out}"],
                          capture_output=True, text=True, timeout=180)
  assert result.returncode == 0, result.stderr[-3000:]
  evaluated = json.loads(out.read_text())
  assert evaluated["global_step"] == trained["global_step"] == trained["selection"]["best_step"]
  assert evaluated["by_split"] == trained["by_split"]  # exactly
  assert sorted(str(p) for p in model_dir.rglob("*")) == before
  assert result.stdout.startswith(f"trainer: step {trained['global_step']}, valid HR@5 ")
  # The latest checkpoint and another protocol, printed as JSON.
  latest = subprocess.run([sys.executable, "-m", "trainer.main", "--mode=eval",
                           f"--model_dir={model_dir}", "--eval_checkpoint=latest",
                           "--eval_negatives=20"], capture_output=True, text=True, timeout=180)
  assert latest.returncode == 0, latest.stderr[-3000:]
  printed = json.loads(latest.stdout)
  assert printed["global_step"] == 12 and printed["protocol"] == "sampled_20"


@pytest.mark.slow
def test_mode_eval_refuses_a_missing_best_and_another_architecture(tiny_windows, tmp_path):
  model_dir = tmp_path / "m"
  train_lib.Trainer(small_trainer_config(tiny_windows.data_dir, model_dir, export=False),
                    tiny_windows).run()

  def run(*flags):
    return subprocess.run([sys.executable, "-m", "trainer.main", "--mode=eval",
                           f"--model_dir={model_dir}", *flags], capture_output=True, text=True,
                          timeout=180)

  missing = run("--eval_checkpoint=best")
  assert missing.returncode == 2
  assert missing.stderr.startswith("trainer: error: --eval_checkpoint=best: ")
  other = run("--emb_dim=32")
  assert other.returncode == 2
  assert other.stderr.strip() == f"trainer: error: --emb_dim=32 differs from 16 of the model in " \
                                 f"{model_dir}"
  nothing = run(f"--model_dir={tmp_path / 'none'}")
  assert nothing.returncode == 2 and "has no trained model" in nothing.stderr


def evaluation_count(model_dir):
  curve = model_dir / "checkpoints" / selection.CURVE_FILE
  return len(json.loads(curve.read_text())["curve"]) if curve.is_file() else 0


@pytest.mark.slow
def test_kill_9_mid_patience_then_rerun_equals_the_uninterrupted_run(tiny_windows, tmp_path):
  args = [*ENV_FLAGS, f"--data_dir={tiny_windows.data_dir}", "--epochs=40",
          "--early_stopping_patience=2", "--steps_per_loop=1", "--checkpoint_every_steps=7"]

  def command(model_dir):
    return [sys.executable, "-m", "trainer.main", *args, f"--model_dir={model_dir}"]

  straight = subprocess.run(command(tmp_path / "a"), capture_output=True, text=True,
                            timeout=300)
  assert straight.returncode == 0, straight.stderr[-3000:]
  uninterrupted = json.loads((tmp_path / "a" / "metrics.json").read_text())
  assert uninterrupted["selection"]["stopped_early"]  # patience mattered
  evaluations = uninterrupted["selection"]["evaluations"]

  proc = subprocess.Popen(command(tmp_path / "b"), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 240
  while evaluation_count(tmp_path / "b") < min(3, evaluations - 1):
    assert proc.poll() is None and time.monotonic() < deadline
    time.sleep(0.02)
  proc.kill()
  proc.wait()
  assert not (tmp_path / "b" / "metrics.json").exists()  # killed before the end
  rerun = subprocess.run(command(tmp_path / "b"), capture_output=True, text=True, timeout=300)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  resumed = json.loads((tmp_path / "b" / "metrics.json").read_text())
  for key in ("global_step", "trained_steps"):
    assert resumed[key] == uninterrupted[key]
  assert [e["step"] for e in resumed["selection"]["curve"]] == \
      [e["step"] for e in uninterrupted["selection"]["curve"]]
  np.testing.assert_allclose(np.load(tmp_path / "b" / "export" / export.ITEM_EMBEDDINGS),
                             np.load(tmp_path / "a" / "export" / export.ITEM_EMBEDDINGS),
                             rtol=1e-5, atol=1e-6)
