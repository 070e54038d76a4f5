"""Shared fixtures: small logs written by the tests themselves (never ../shared)."""

import contextlib
import dataclasses
import os
import subprocess

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from preprocess import pipeline, synthetic  # noqa: E402


# Two logical CPU devices for MirroredStrategy tests (no GPU here). TF allows
# this only before it starts, so it is done once for the whole session.
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0],
    [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])


@pytest.fixture(autouse=True)
def _no_global_tf_seed_between_tests():
  """A test that seeds TensorFlow's global generator leaves it as it found it,
  so no test's outcome depends on the ones that ran before it."""
  yield
  tf.random.set_seed(None)


@contextlib.contextmanager
def small_tmpfs(path, size: str, readonly: bool = False):
  """A tmpfs of `size` mounted at `path` for the block: a real full (or
  read-only) disk. Skips the test where mounting is not allowed (not root)."""
  path.mkdir()
  options = f"size={size}" + (",ro" if readonly else "")
  done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                        capture_output=True)
  if done.returncode != 0:
    pytest.skip("cannot mount a tmpfs here (needs root)")
  try:
    yield path
  finally:
    subprocess.run(["umount", str(path)], check=False)


@pytest.fixture(scope="session")
def tiny_news_dir(tmp_path_factory):
  """The tiny synthetic preset in the notebooks' news schema."""
  path = tmp_path_factory.mktemp("tiny") / "raw"
  synthetic.write(synthetic.PRESETS["tiny"], path)
  return path


def make_config(input_dir, output_dir, **overrides) -> pipeline.PreprocessConfig:
  base = pipeline.PreprocessConfig(source="news", input=str(input_dir),
                                   output_dir=str(output_dir), num_shards=3, num_workers=1)
  return dataclasses.replace(base, **overrides)


@pytest.fixture(scope="session")
def tiny_data(tiny_news_dir, tmp_path_factory):
  """preprocess output of the tiny log (positions, holdout=valid_test)."""
  out = tmp_path_factory.mktemp("tiny_data") / "data"
  return pipeline.run(make_config(tiny_news_dir, out, holdout="valid_test", max_seq_len=8))


@pytest.fixture(scope="session")
def tiny_windows(tiny_news_dir, tmp_path_factory):
  """Tiny log as windows of 8 (for the all-position loss), valid_test holdout."""
  out = tmp_path_factory.mktemp("tiny_windows") / "data"
  return pipeline.run(make_config(tiny_news_dir, out, samples="windows", max_seq_len=8,
                                  holdout="valid_test", num_shards=4))


def small_trainer_config(data_dir, model_dir, **overrides):
  """A model small enough for unit tests to train in a second or two."""
  from trainer.config import TrainerConfig
  base = dict(data_dir=str(data_dir), model_dir=str(model_dir), batch_size=16,
              emb_dim=16, num_heads=2, num_blocks=1, ff_dim=16, tower_units=(16,),
              train_steps=4, steps_per_loop=2, log_every_steps=2,
              checkpoint_every_steps=2, eval_topk=(5, 10), eval_batch_size=64,
              warmup_steps=1, jit_compile=False, shuffle_buffer=256,
              early_stopping_metric="")  # model selection: tests/test_selection.py
  # Built in one call, not dataclasses.replace: the model's own defaults
  # (the registry entry's defaults) must resolve for the model asked for.
  return TrainerConfig(**{**base, **overrides})


@pytest.fixture(scope="session")
def tiny_export(tiny_data, tmp_path_factory):
  """A sasrec trained a few steps on the tiny data, exported, evaluated on test."""
  from trainer import train_lib
  model_dir = tmp_path_factory.mktemp("tiny_model") / "m"
  config = small_trainer_config(tiny_data.data_dir, model_dir, train_steps=20,
                                eval_split="test", eval_topk=(5, 10))
  train_lib.train(config, tiny_data)
  return model_dir


@pytest.fixture(scope="session")
def tiny_ranking(tiny_data, tiny_export, tmp_path_factory):
  """The real chain on the tiny data: retrieval of the valid and the test lists
  (top 20) by the tiny sasrec -> ranking data (history 6, 5 negatives per user)."""
  from preprocess import ranking
  from retrieval import job
  root = tmp_path_factory.mktemp("tiny_ranking")
  outs = []
  for split in ("valid", "test"):
    job.run(job.RetrievalConfig(data_dir=str(tiny_data.data_dir), model_dir=str(tiny_export),
                                output_dir=str(root / split), topk=20, eval_split=split,
                                eval_topk=(5, 10)))
    outs.append(str(root / split))
  return ranking.run(ranking.RankingConfig(
      data_dir=str(tiny_data.data_dir), candidates=tuple(outs), output_dir=str(root / "data"),
      max_hist_len=6, negatives_per_user=5, num_shards=2))


# The tiny model of the multi-worker tests: deterministic (no dropout), a few steps.
TINY_WORKER_FLAGS = ["--model=sasrec", "--batch_size=16", "--emb_dim=16", "--num_heads=2",
                     "--num_blocks=1", "--ff_dim=16", "--warmup_steps=1", "--eval_topk=5,10",
                     "--nojit_compile", "--shuffle_buffer=256", "--dropout=0",
                     "--item_dropout=0"]
# A 3-step in-batch run with export: the 2-process launcher's reference run.
TWO_WORKER_RUN_FLAGS = [*TINY_WORKER_FLAGS, "--loss=in_batch", "--train_steps=3",
                        "--steps_per_loop=1", "--log_every_steps=1", "--checkpoint_every_steps=2",
                        "--export"]


@pytest.fixture(scope="session")
def two_worker_run(tiny_windows, tmp_path_factory):
  """TWO_WORKER_RUN_FLAGS through tools/launch_workers.py with 2 local workers:
  (exit code, model_dir, {worker: log text})."""
  import sys
  from pathlib import Path
  sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
  import launch_workers
  root = tmp_path_factory.mktemp("two_workers")
  code = launch_workers.run_workers(
      [*TWO_WORKER_RUN_FLAGS, f"--data_dir={tiny_windows.data_dir}", f"--model_dir={root / 'm'}"],
      num_workers=2, log_dir=root / "logs", grace_seconds=30)
  logs = {i: (root / "logs" / f"worker_{i}.log").read_text() for i in range(2)}
  return code, root / "m", logs


@pytest.fixture(scope="module")
def local_ray():
  """A new local Ray of 2 CPUs for the tests of one module (skipped without the
  extra). Per module, so the driver's threads do not outlive the tests that use
  it in a worker that goes on training TensorFlow models; "local", so it is
  never a cluster some other process started."""
  ray = pytest.importorskip("ray")
  ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
  yield ray
  ray.shutdown()


def environment_without(module: str, tmp_path) -> dict[str, str]:
  """This environment with `module` made unimportable for a subprocess (a
  package of that name whose import raises, first on PYTHONPATH)."""
  fake = tmp_path / "without" / module
  fake.mkdir(parents=True)
  (fake / "__init__.py").write_text(f"raise ImportError('No module named {module}')\n")
  return {**os.environ, "PYTHONPATH": str(tmp_path / "without")}
