"""trainer --launcher=ray: Ray Train workers run the multi-worker training of the TF_CONFIG launcher."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from conftest import TWO_WORKER_RUN_FLAGS, environment_without
from trainer import export, train_lib

pytest.importorskip("ray")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.xdist_group("cluster")  # with the other users of two_worker_run and Ray
def test_two_ray_train_workers_train_like_the_two_process_launcher(two_worker_run, tiny_windows,
                                                                  tmp_path):
  code, launched, logs = two_worker_run  # TWO_WORKER_RUN_FLAGS through tools/launch_workers.py
  assert code == 0, logs
  on_ray = tmp_path / "ray"
  # Its own local Ray: actors other tests leave on a shared one could hold its CPUs.
  # Ray runs its workers at nice 15: beside busy processes they start slowly, hence the margin.
  result = subprocess.run(
      [sys.executable, "-m", "trainer.main", "--launcher=ray", "--num_workers=2",
       *TWO_WORKER_RUN_FLAGS,
       f"--data_dir={tiny_windows.data_dir}", f"--model_dir={on_ray}"],
      capture_output=True, text=True, cwd=ROOT, timeout=840)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"trainer: step 3 on 2 Ray workers ({on_ray}/metrics.json)" in result.stdout
  # The same loss at every step: the same cluster shape, data split and initial weights.
  expected, got = train_lib.train_scalars(launched, "loss"), train_lib.train_scalars(on_ray, "loss")
  assert sorted(got) == sorted(expected) == [1, 2, 3]
  np.testing.assert_allclose([got[s] for s in (1, 2, 3)], [expected[s] for s in (1, 2, 3)],
                             rtol=1e-5)
  # Only the chief wrote the model directory: its checkpoints, metrics and export.
  assert tf.train.latest_checkpoint(str(on_ray / "checkpoints")).endswith("ckpt-3")
  assert not (on_ray / train_lib.WORKER_TMP_DIR).exists()
  metrics = json.loads((on_ray / "metrics.json").read_text())
  wanted = json.loads((launched / "metrics.json").read_text())
  assert metrics["ndcg@10"] == pytest.approx(wanted["ndcg@10"], rel=1e-5)
  np.testing.assert_allclose(np.load(on_ray / "export" / export.ITEM_EMBEDDINGS),
                             np.load(launched / "export" / export.ITEM_EMBEDDINGS), rtol=1e-5,
                             atol=1e-6)


def test_without_ray_the_launcher_is_a_one_line_error_naming_the_extra(tiny_windows, tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "trainer.main", "--launcher=ray", f"--data_dir={tiny_windows.data_dir}",
       f"--model_dir={tmp_path / 'm'}"], capture_output=True, text=True, cwd=ROOT,
      env=environment_without("ray", tmp_path))
  assert result.returncode == 2
  assert result.stderr.strip() == ("trainer: error: --launcher=ray needs Ray Train (No module "
                                   "named ray); install it with pip install -e '.[ray]'")
  assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("flag, message", [
    ("--strategy=mirrored", "--strategy=mirrored: --launcher=ray trains with "
                            "--strategy=multi_worker"),
    ("--mode=eval", "--mode=eval: --launcher=ray trains; evaluate with --mode=eval in one "
                    "process"),
])
def test_launcher_flags_it_cannot_honour_are_one_line_errors(tiny_windows, tmp_path, flag,
                                                             message):
  result = subprocess.run(
      [sys.executable, "-m", "trainer.main", "--launcher=ray", flag,
       f"--data_dir={tiny_windows.data_dir}", f"--model_dir={tmp_path / 'm'}"],
      capture_output=True, text=True, cwd=ROOT)
  assert result.returncode == 2
  assert result.stderr.strip() == f"trainer: error: {message}"
  assert not (tmp_path / "m").exists()
