"""trainer --launcher=ray: Ray Train workers run the multi-worker training of the TF_CONFIG launcher."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from trainer import train_lib

pytest.importorskip("ray")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import launch_workers  # noqa: E402

# As tests/test_multi_worker.py: tiny, deterministic (no dropout), a few steps.
TINY_RUN = ["--model=sasrec", "--batch_size=16", "--emb_dim=16", "--num_heads=2",
            "--num_blocks=1", "--ff_dim=16", "--warmup_steps=1", "--eval_topk=5,10",
            "--nojit_compile", "--shuffle_buffer=256", "--dropout=0", "--item_dropout=0",
            "--loss=in_batch", "--train_steps=4", "--steps_per_loop=1", "--log_every_steps=1",
            "--checkpoint_every_steps=2", "--noexport", "--early_stopping_metric="]


@pytest.mark.slow
def test_two_ray_train_workers_train_like_the_two_process_launcher(tiny_windows, tmp_path):
  data = f"--data_dir={tiny_windows.data_dir}"
  launched, on_ray = tmp_path / "launched", tmp_path / "ray"
  code = launch_workers.run_workers([*TINY_RUN, data, f"--model_dir={launched}"], num_workers=2,
                                    log_dir=tmp_path / "logs", grace_seconds=30)
  assert code == 0, (tmp_path / "logs" / "worker_0.log").read_text()[-3000:]
  result = subprocess.run(
      [sys.executable, "-m", "trainer.main", "--launcher=ray", "--num_workers=2", *TINY_RUN,
       data, f"--model_dir={on_ray}"], capture_output=True, text=True, cwd=ROOT,
      env={**os.environ, "RAY_DEDUP_LOGS": "0"})
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"trainer: step 4 on 2 Ray workers ({on_ray}/metrics.json)" in result.stdout
  # The same loss at every step: the same cluster shape, data split and initial weights.
  expected, got = train_lib.train_scalars(launched, "loss"), train_lib.train_scalars(on_ray, "loss")
  assert sorted(got) == sorted(expected) == [1, 2, 3, 4]
  np.testing.assert_allclose([got[s] for s in range(1, 5)], [expected[s] for s in range(1, 5)],
                             rtol=1e-5)
  # Only the chief wrote the model directory: its checkpoints and final metrics.
  assert tf.train.latest_checkpoint(str(on_ray / "checkpoints")).endswith("ckpt-4")
  assert not (on_ray / train_lib.WORKER_TMP_DIR).exists()
  metrics = json.loads((on_ray / "metrics.json").read_text())
  wanted = json.loads((launched / "metrics.json").read_text())
  assert metrics["ndcg@10"] == pytest.approx(wanted["ndcg@10"], rel=1e-5)


def test_without_ray_the_launcher_is_a_one_line_error_naming_the_extra(tiny_windows, tmp_path):
  fake = tmp_path / "site" / "ray"
  fake.mkdir(parents=True)
  (fake / "__init__.py").write_text("raise ImportError('No module named ray')\n")
  result = subprocess.run(
      [sys.executable, "-m", "trainer.main", "--launcher=ray", f"--data_dir={tiny_windows.data_dir}",
       f"--model_dir={tmp_path / 'm'}"], capture_output=True, text=True, cwd=ROOT,
      env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
  assert result.returncode == 2
  assert result.stderr.strip() == ("trainer: error: --launcher=ray needs Ray Train (No module "
                                   "named ray); install it with pip install -e '.[ray]'")
  assert not (tmp_path / "m").exists()
