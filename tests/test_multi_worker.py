"""--strategy=multi_worker: TF_CONFIG checks, and real worker processes on 127.0.0.1.

The process tests start `trainer` workers through tools/launch_workers.py
(or its environments, to kill one): each pays TensorFlow's start-up, so the
model is tiny and the runs are a few steps.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from conftest import TINY_WORKER_FLAGS, TWO_WORKER_RUN_FLAGS, small_trainer_config
from contracts.errors import ConfigError
from trainer import cluster, input_pipeline, train_lib

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import launch_workers  # noqa: E402

TINY_MODEL = TINY_WORKER_FLAGS


# --- TF_CONFIG --------------------------------------------------------------

def test_tf_config_of_the_second_worker_parses():
  parsed = cluster.parse(cluster.tf_config({"worker": ["a:1", "b:2"]}, "worker", 1))
  assert (parsed.num_workers, parsed.is_chief, parsed.worker_name) == (2, False, "worker_1")
  assert cluster.parse(cluster.tf_config({"worker": ["a:1", "b:2"]}, "worker", 0)).is_chief
  with_chief = {"chief": ["c:1"], "worker": ["a:1"]}
  assert cluster.parse(cluster.tf_config(with_chief, "chief", 0)).num_workers == 2
  assert not cluster.parse(cluster.tf_config(with_chief, "worker", 0)).is_chief


@pytest.mark.parametrize("tf_config, names", [
    (None, "needs the TF_CONFIG environment variable"),
    ("{cluster: 1}", "not valid JSON"),
    ('["worker"]', "must be a JSON object"),
    ('{"task": {"type": "worker", "index": 0}}', 'no "cluster"'),
    ('{"cluster": {"ps": ["a:1"]}, "task": {"type": "ps", "index": 0}}', "'ps' is not supported"),
    ('{"cluster": {"worker": ["a:1", "b"]}, "task": {"type": "worker", "index": 0}}',
     "worker[1] = 'b' is not 'host:port'"),
    ('{"cluster": {"worker": ["a:99999"]}, "task": {"type": "worker", "index": 0}}',
     "port '99999'"),
    ('{"cluster": {"worker": ["a:1", "a:1"]}, "task": {"type": "worker", "index": 0}}',
     "address twice"),
    ('{"cluster": {"worker": ["a:1"]}}', 'no "task"'),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "chief", "index": 0}}',
     "task type 'chief' is not a job"),
    ('{"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 2}}',
     "index 2 is out of range: the 'worker' job has 2 task(s)"),
])
def test_bad_tf_config_is_rejected_naming_the_fault(tf_config, names):
  with pytest.raises(ConfigError) as error:
    cluster.parse(tf_config)
  assert names in str(error.value)


def test_trainer_rejects_a_bad_tf_config_before_starting_tensorflow(tiny_windows, tmp_path):
  env = dict(os.environ, TF_CONFIG='{"cluster": {"worker": ["127.0.0.1:1"]}, '
                                   '"task": {"type": "worker", "index": 3}}')
  out = subprocess.run([sys.executable, "-m", "trainer.main", "--strategy=multi_worker",
                        f"--data_dir={tiny_windows.data_dir}", f"--model_dir={tmp_path / 'm'}"],
                       capture_output=True, text=True, cwd=ROOT, env=env)
  assert out.returncode == 2
  assert "trainer: error: TF_CONFIG task index 3 is out of range" in out.stderr
  assert not (tmp_path / "m").exists()


def test_fewer_train_shards_than_workers_is_a_data_error(tiny_windows):
  with pytest.raises(input_pipeline.DataError, match="has 4 shards for 5 input pipelines"):
    input_pipeline.split_files(tiny_windows, "train", 0, 5)


# --- worker processes ---------------------------------------------------------

def first_step_loss(model_dir: Path) -> float:
  """The `loss` scalar the chief wrote for step 1 (TensorBoard event file)."""
  losses = train_lib.train_scalars(model_dir, "loss")
  assert 1 in losses, f"no loss at step 1 in {model_dir}"
  return losses[1]


def single_process_loss_of_the_same_global_batch(manifest, model_dir, loss, workers):
  """Step 1's loss in one process on the concatenation of every worker's first
  batch (worker order = replica order), from the same seeded initial weights."""
  config = small_trainer_config(manifest.data_dir, model_dir, loss=loss, dropout=0.0,
                                item_dropout=0.0)
  trainer = train_lib.Trainer(config, manifest)
  steps = input_pipeline.steps_per_epoch(manifest, 16, workers, workers)
  reader = input_pipeline.TrainReader(manifest, 16, config.seed, steps,
                                      shuffle_buffer=config.shuffle_buffer)
  parts = [next(iter(reader(tf.distribute.InputContext(workers, worker, workers))))
           for worker in range(workers)]
  batch = {name: tf.concat([p[name] for p in parts], axis=0) for name in parts[0]}
  return float(trainer.task.loss(trainer.task.forward(batch, training=True, step=0), 0))


@pytest.mark.parametrize("loss", ["in_batch", "softmax"])
@pytest.mark.slow
@pytest.mark.xdist_group("cluster")  # two_worker_run once, on the xdist worker of its other user
def test_two_workers_train_like_one_process_and_only_the_chief_writes(request, tiny_windows,
                                                                      tmp_path, loss):
  if loss == "in_batch":  # the session's reference run (tests/test_trainer_ray.py uses it too)
    code, model_dir, logs = request.getfixturevalue("two_worker_run")
  else:
    model_dir = tmp_path / "m"
    flags = [f for f in TWO_WORKER_RUN_FLAGS if f not in ("--loss=in_batch", "--export")]
    code = launch_workers.run_workers(
        [*flags, "--loss=softmax", "--noexport", f"--data_dir={tiny_windows.data_dir}",
         f"--model_dir={model_dir}"], num_workers=2, log_dir=tmp_path / "logs",
        grace_seconds=30)
    logs = {i: (tmp_path / "logs" / f"worker_{i}.log").read_text() for i in range(2)}
  assert code == 0, logs
  # The global batch of 16 is split over the 2 workers' replicas, each worker
  # reading its half of the 4 shards; in_batch gathers negatives over both.
  assert "global batch 16 on 2 replicas" in logs[0]
  expected = single_process_loss_of_the_same_global_batch(tiny_windows, tmp_path / "single",
                                                          loss, workers=2)
  np.testing.assert_allclose(first_step_loss(model_dir), expected, rtol=2e-5)
  # Only the chief's files exist; the other worker's temporary checkpoints are gone.
  assert sorted(p.name for p in model_dir.iterdir()) == sorted(
      [".lock", "checkpoints", "metrics.json", "summaries", "trainer_config.json"] +
      (["export"] if loss == "in_batch" else []))
  assert "trainer: step 3" in logs[0] and "trainer: step" not in logs[1]
  # The chief's checkpoint loads into a fresh single-process model.
  config = small_trainer_config(tiny_windows.data_dir, model_dir, loss=loss, dropout=0.0)
  restored = train_lib.Trainer(config, tiny_windows)
  assert restored.restore() == 3


@pytest.mark.slow
def test_a_killed_worker_fails_the_other_and_a_rerun_resumes(tiny_windows, tmp_path):
  model_dir = tmp_path / "m"
  args = [*TINY_MODEL, "--loss=softmax", "--noexport", f"--data_dir={tiny_windows.data_dir}",
          f"--model_dir={model_dir}", "--steps_per_loop=1", "--log_every_steps=1",
          "--checkpoint_every_steps=5"]
  command = [sys.executable, "-m", "trainer.main", "--strategy=multi_worker",
             "--train_steps=100000", *args]
  logs = [open(tmp_path / f"worker_{i}.log", "w") for i in range(2)]
  workers = [subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
             for env, log in zip(launch_workers.worker_environments(2), logs)]
  try:
    deadline = time.monotonic() + 240
    while "step 12/" not in (tmp_path / "worker_0.log").read_text():  # a checkpoint at 10
      assert time.monotonic() < deadline and workers[0].poll() is None, \
          (tmp_path / "worker_0.log").read_text()
      time.sleep(0.2)
    workers[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    code = workers[0].wait(timeout=120)
    seconds = time.monotonic() - killed
  finally:
    for w in workers:
      if w.poll() is None:
        w.kill()
    for log in logs:
      log.close()
  chief_log = (tmp_path / "worker_0.log").read_text()
  assert code == 1, chief_log
  assert seconds < 60  # bounded: no hang on the dead peer's collectives
  assert "trainer: error: worker_0: steps" in chief_log
  assert "a worker of the cluster died or stopped responding" in chief_log
  latest = tf.train.latest_checkpoint(str(model_dir / "checkpoints"))
  assert latest is not None and "re-run every worker" in chief_log
  saved_step = int(latest.rsplit("-", 1)[1])
  assert saved_step >= 10

  # Re-running every worker resumes from the chief's last checkpoint.
  code = launch_workers.run_workers([*args, f"--train_steps={saved_step + 2}"], num_workers=2,
                                    log_dir=tmp_path / "rerun", grace_seconds=30)
  rerun = [(tmp_path / "rerun" / f"worker_{i}.log").read_text() for i in range(2)]
  assert code == 0, rerun
  for log in rerun:
    assert f"at step {saved_step}" in log and "resumed from" in log
  assert f"trainer: step {saved_step + 2}" in rerun[0]


@pytest.mark.slow
def test_two_workers_take_the_chiefs_early_stopping_decision(tiny_windows, tmp_path):
  """The chief evaluates and decides; the other worker stops at the same step."""
  model_dir = tmp_path / "m"
  code = launch_workers.run_workers(
      [*TINY_MODEL, "--loss=softmax", "--noexport", f"--data_dir={tiny_windows.data_dir}",
       f"--model_dir={model_dir}", "--train_steps=60", "--steps_per_loop=1",
       "--eval_every_steps=2", "--early_stopping_metric=ndcg@10",
       "--early_stopping_patience=1", "--lr_schedule=constant"],
      num_workers=2, log_dir=tmp_path / "logs", grace_seconds=30)
  logs = [(tmp_path / "logs" / f"worker_{i}.log").read_text() for i in range(2)]
  assert code == 0, logs
  metrics = json.loads((model_dir / "metrics.json").read_text())
  stop = metrics["trained_steps"]
  assert metrics["selection"]["stopped_early"] and stop < 60
  assert f"early stopping at step {stop}: ndcg@10 did not improve" in logs[0]
  assert f"early stopping at step {stop}: the chief's decision" in logs[1]
  assert metrics["global_step"] == metrics["selection"]["best_step"] < stop
