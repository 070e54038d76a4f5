"""Training throughput of 1 process against N local worker processes.

  python tools/bench_multi_worker.py --data_dir=DATA --work_dir=/tmp/bench_mw \
      [--num_workers=2] [--steps=40] [-- extra trainer flags]

Cases, all with the same global batch and model (flags after `--`):
  single        one process, --strategy=default, every core;
  workers       --num_workers processes through tools/launch_workers.py
                (--strategy=multi_worker), each with cores/N intra-op threads;
  one_share     one process, --strategy=default, cores/N threads and the
                per-worker batch: what one worker computes per step without
                the others.
Step time of `workers` minus `one_share` is what synchronising costs per
step (gradient all-reduce, the loss's collectives, waiting for the slower
worker). Rates are the chief's TensorBoard `examples_per_second` after the
first logging window (which holds tracing and compilation).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent))
import launch_workers  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "preprocess output to train on.")
flags.DEFINE_string("work_dir", None, "Model directories and logs of every case go here.")
flags.DEFINE_integer("num_workers", 2, "Worker processes of the `workers` case.")
flags.DEFINE_integer("steps", 40, "Steps per case (the first --log_every of them not timed).")
flags.DEFINE_integer("log_every", 10, "Steps per timing window.")
flags.DEFINE_integer("batch_size", 64, "Global batch size.")
flags.DEFINE_list("cases", ["single", "workers", "one_share"], "Cases to run.")
flags.mark_flags_as_required(["data_dir", "work_dir"])


def examples_per_second(model_dir: Path) -> float:
  """Mean of the chief's examples/s windows after the first."""
  from trainer import train_lib  # TensorFlow: only once a case has run
  rates = train_lib.train_scalars(model_dir, "examples_per_second")
  timed = [rate for step, rate in sorted(rates.items())[1:]]
  if not timed:
    raise RuntimeError(f"{model_dir}: no timed window; raise --steps")
  return float(np.mean(timed))


def trainer_flags(model_dir: Path, batch_size: int, extra: list[str]) -> list[str]:
  # `extra` first: a later flag wins, so a --flagfile there cannot override these.
  return [*extra, f"--data_dir={FLAGS.data_dir}", f"--model_dir={model_dir}",
          f"--batch_size={batch_size}", f"--train_steps={FLAGS.steps}",
          f"--log_every_steps={FLAGS.log_every}", f"--steps_per_loop={FLAGS.log_every}",
          f"--checkpoint_every_steps={FLAGS.steps}", "--eval_every_steps=0", "--noexport"]


def run_single(name: str, batch_size: int, threads: int, extra: list[str]) -> dict:
  work = Path(FLAGS.work_dir) / name
  env = dict(os.environ)
  if threads:
    env["TF_NUM_INTRAOP_THREADS"] = str(threads)
  with open(work.parent / f"{name}.log", "w") as log:
    subprocess.run([sys.executable, "-m", "trainer.main", "--strategy=default",
                    *trainer_flags(work, batch_size, extra)], env=env, stdout=log,
                   stderr=subprocess.STDOUT, check=True, cwd=launch_workers.REPO_ROOT)
  rate = examples_per_second(work)
  return {"examples_per_s": rate, "ms_per_step": 1000 * batch_size / rate}


def main(argv):
  extra = argv[1:]
  work = Path(FLAGS.work_dir)
  work.mkdir(parents=True, exist_ok=True)
  cores, n = os.cpu_count() or 1, FLAGS.num_workers
  share = max(cores // n, 1)
  results = {"cores": cores, "num_workers": n, "global_batch": FLAGS.batch_size,
             "extra_flags": extra}
  if "single" in FLAGS.cases:
    results["single"] = run_single("single", FLAGS.batch_size, 0, extra)
  if "workers" in FLAGS.cases:
    code = launch_workers.run_workers(
        trainer_flags(work / "workers", FLAGS.batch_size, extra), n, work / "workers_logs",
        grace_seconds=60, intra_op_threads=share)
    if code:
      raise SystemExit(f"bench_multi_worker: the workers failed (logs in {work}/workers_logs)")
    rate = examples_per_second(work / "workers")
    results["workers"] = {"examples_per_s": rate,
                          "ms_per_step": 1000 * FLAGS.batch_size / rate}
  if "one_share" in FLAGS.cases:
    results["one_share"] = run_single("one_share", FLAGS.batch_size // n, share, extra)
  if "workers" in results and "one_share" in results:
    results["sync_ms_per_step"] = results["workers"]["ms_per_step"] - \
        results["one_share"]["ms_per_step"]
  print(json.dumps(results, indent=1))


if __name__ == "__main__":
  app.run(main)
