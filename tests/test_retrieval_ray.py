"""retrieval --engine=ray on a local 2-CPU Ray (conftest's local_ray): the default
engine's output, retries, re-runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import environment_without
from retrieval import job
from retrieval import output

ray = pytest.importorskip("ray")
from retrieval import ray_engine  # noqa: E402

# One xdist worker runs every test that starts Ray or the 2-worker reference run.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("cluster")]
SHARES = 3
TIMING = {"queries_per_s", "users_per_s"}


# The failing actors below are defined here; Ray's workers get them by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def config(tiny_data, tiny_export, out, **overrides):
  return job.RetrievalConfig(**{
      "data_dir": str(tiny_data.data_dir), "model_dir": str(tiny_export), "output_dir": str(out),
      "topk": 20, "batch_size": 40, "eval_split": "test", "eval_topk": (5, 10),
      "num_workers": SHARES, **overrides})


@pytest.fixture(scope="module")
def reference(tiny_data, tiny_export, tmp_path_factory):
  """The default engine's output: SHARES processes' worth of shares, one after another."""
  out = tmp_path_factory.mktemp("reference") / "out"
  for w in range(SHARES):
    result = job.run(config(tiny_data, tiny_export, out, worker_index=w))
  return out, result


def parts(out: Path) -> dict[str, pd.DataFrame]:
  return {p.name: pq.read_table(p).to_pandas()
          for p in sorted((out / job.CANDIDATES_DIR).iterdir())}


def assert_same_output(out: Path, expected: Path):
  got, want = parts(out), parts(expected)
  assert list(got) == list(want)  # the same part names: no partial, temporary or extra file
  for name in want:
    pd.testing.assert_frame_equal(got[name], want[name], obj=name)
  metrics = json.loads((out / job.METRICS_FILE).read_text())
  wanted = json.loads((expected / job.METRICS_FILE).read_text())
  assert {k: v for k, v in metrics.items() if k not in TIMING} == \
      {k: v for k, v in wanted.items() if k not in TIMING}
  assert (out / job.SUCCESS_FILE).is_file()


class DiesOnceInAPart(ray_engine.ShareWorker):
  """Its process dies while writing share 1's second part, the first time only,
  leaving the temporary a killed writer leaves behind."""

  def __init__(self, config, cpus_per_worker):
    super().__init__(config, cpus_per_worker)
    marker = Path(config.output_dir).parent / "died"
    original = self.runner.write_part

    def write_part(path, *args):
      if path.name.startswith(output.part_name(1, SHARES, 1)) and not marker.exists():
        marker.write_text("")
        (path.parent / f".{path.name}.tmp-killed").write_bytes(b"PAR1 half a file")
        os._exit(1)
      original(path, *args)

    self.runner.write_part = write_part


def test_an_actor_that_dies_in_a_part_is_retried_and_the_output_is_the_default_engines(
    local_ray, tiny_data, tiny_export, reference, tmp_path):
  out = tmp_path / "out"
  result = ray_engine.run(config(tiny_data, tiny_export, out), num_actors=2,
                          worker_class=DiesOnceInAPart)
  assert (tmp_path / "died").exists()  # the actor did die, and Ray retried its share
  expected, expected_result = reference
  assert_same_output(out, expected)  # part for part; the killed attempt's temporary is gone
  assert not list((out / job.CANDIDATES_DIR).glob(".*"))
  assert result["ndcg@10"] == expected_result["ndcg@10"] and result["users"] > 0


class FailsInShare2(ray_engine.ShareWorker):
  def __call__(self, batch):
    if 2 in [int(w) for w in batch["share"]]:
      raise RuntimeError("share 2 failed")
    return super().__call__(batch)


def test_a_failed_job_rerun_equals_the_uninterrupted_one_without_duplicate_rows(
    local_ray, tiny_data, tiny_export, reference, tmp_path):
  out = tmp_path / "out"
  with pytest.raises(Exception, match="share 2 failed"):
    ray_engine.run(config(tiny_data, tiny_export, out), num_actors=1, worker_class=FailsInShare2)
  assert not (out / job.SUCCESS_FILE).exists()
  ray_engine.run(config(tiny_data, tiny_export, out), num_actors=2)
  assert_same_output(out, reference[0])
  rows = pd.concat(parts(out).values())
  assert not rows.duplicated(["user_id", "recall_rank"]).any()


def test_without_ray_the_engine_is_a_one_line_error_naming_the_extra(tmp_path):
  env = environment_without("ray", tmp_path)
  result = subprocess.run(
      [sys.executable, "-m", "retrieval.main", "--engine=ray", f"--data_dir={tmp_path}",
       f"--model_dir={tmp_path}", f"--output_dir={tmp_path / 'out'}"],
      capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
  assert result.returncode == 2
  assert result.stderr.strip() == ("retrieval: error: --engine=ray needs Ray (No module named "
                                   "ray); install it with pip install -e '.[ray]'")


def test_a_worker_index_with_the_ray_engine_is_a_one_line_error(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "retrieval.main", "--engine=ray", "--worker_index=1",
       "--num_workers=2", f"--data_dir={tmp_path}", f"--model_dir={tmp_path}",
       f"--output_dir={tmp_path / 'out'}"],
      capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
  assert result.returncode == 2
  assert result.stderr.strip() == ("retrieval: error: --worker_index=1: --engine=ray runs every "
                                   "share itself; leave it at 0")
  assert not (tmp_path / "out").exists()
