"""Runs `trainer --strategy=multi_worker` as N local worker processes on 127.0.0.1.

  python tools/launch_workers.py --num_workers=2 --worker_log_dir=build/mw/logs -- \
      --model=sasrec --data_dir=DATA --model_dir=build/mw/model

For trying multi-worker training on one machine (and for its tests). Each
worker gets a free port and the TF_CONFIG a cluster manager would set
(worker 0 is the chief); flags after `--` go to every worker. Each worker's
output goes to LOG_DIR/worker_I.log. On several machines, set TF_CONFIG on
each host yourself (README, "Training on several machines").

If a worker exits with an error, the others get --grace_seconds to fail on
their own (TensorFlow aborts their collectives when a peer's connection
drops or its heartbeats stop) and are then killed; the exit code is the
first failing worker's. SIGTERM/SIGINT are passed on to every worker, which
checkpoints and stops (re-run the same command to resume).
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer import cluster  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_ports(count: int) -> list[int]:
  """Ports the OS reports free now (bound together, so they differ)."""
  sockets = []
  try:
    for _ in range(count):
      s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
      s.bind(("127.0.0.1", 0))
      sockets.append(s)
    return [s.getsockname()[1] for s in sockets]
  finally:
    for s in sockets:
      s.close()


def worker_environments(num_workers: int, intra_op_threads: int = 0) -> list[dict[str, str]]:
  """One environment per worker: this one plus its TF_CONFIG."""
  jobs = {"worker": [f"127.0.0.1:{port}" for port in free_ports(num_workers)]}
  environments = []
  for index in range(num_workers):
    env = dict(os.environ, TF_CONFIG=cluster.tf_config(jobs, "worker", index))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                      env.get("PYTHONPATH", "")]))
    if intra_op_threads > 0:
      env["TF_NUM_INTRAOP_THREADS"] = str(intra_op_threads)
    environments.append(env)
  return environments


def run_workers(trainer_args: list[str], num_workers: int, log_dir: Path,
                grace_seconds: float, intra_op_threads: int = 0) -> int:
  """Starts the workers, waits for all; returns 0 or the first failing exit code."""
  log_dir.mkdir(parents=True, exist_ok=True)
  command = [sys.executable, "-m", "trainer.main", "--strategy=multi_worker", *trainer_args]
  processes, logs = [], []
  for index, env in enumerate(worker_environments(num_workers, intra_op_threads)):
    log = open(log_dir / f"worker_{index}.log", "w")
    logs.append(log)
    processes.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      cwd=REPO_ROOT))
  print(f"launch_workers: {num_workers} workers, logs in {log_dir}/worker_I.log", flush=True)

  def forward(signum, frame):
    del frame
    for p in processes:
      if p.poll() is None:
        p.send_signal(signum)

  previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
  first_failure, failed_at = None, None
  try:
    while any(p.poll() is None for p in processes):
      for index, p in enumerate(processes):
        if p.returncode and first_failure is None:
          first_failure, failed_at = index, time.monotonic()
          print(f"launch_workers: worker {index} exited with {p.returncode}; waiting up to "
                f"{grace_seconds:.0f} s for the others", flush=True)
      if failed_at is not None and time.monotonic() - failed_at > grace_seconds:
        for index, p in enumerate(processes):
          if p.poll() is None:
            print(f"launch_workers: killing worker {index}, still running "
                  f"{grace_seconds:.0f} s after worker {first_failure} failed", flush=True)
            p.kill()
      time.sleep(0.2)
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
    for p in processes:  # only if the launcher itself failed: no orphaned workers
      if p.poll() is None:
        p.kill()
        p.wait()
    for log in logs:
      log.close()
  for index, p in enumerate(processes):
    if p.returncode and first_failure is None:
      first_failure = index
  for index, p in enumerate(processes):
    print(f"launch_workers: worker {index} exit code {p.returncode} "
          f"({log_dir / f'worker_{index}.log'})")
  if first_failure is not None:
    tail = (log_dir / f"worker_{first_failure}.log").read_text().strip().splitlines()[-5:]
    print("\n".join(f"  worker {first_failure}: {line}" for line in tail), file=sys.stderr)
    return processes[first_failure].returncode or 1
  chief_lines = (log_dir / "worker_0.log").read_text().strip().splitlines()
  results = [line for line in chief_lines if line.startswith("trainer: ")]
  if results:
    print(results[-1])
  return 0


def define_flags():
  """Only when run as a program: importers (tests, benchmarks) keep their own flags."""
  flags.DEFINE_integer("num_workers", 2, "Worker processes to start.")
  flags.DEFINE_string("worker_log_dir", None, "Where worker_I.log of each worker goes.")
  flags.DEFINE_integer("grace_seconds", 60,
                       "After one worker fails, how long the others may take to stop by "
                       "themselves before they are killed.")
  flags.DEFINE_integer("intra_op_threads", 0,
                       "If > 0: TF_NUM_INTRAOP_THREADS of each worker (share a small machine).")
  flags.mark_flag_as_required("worker_log_dir")


def main(argv):
  FLAGS = flags.FLAGS
  if FLAGS.num_workers < 1:
    raise app.UsageError(f"--num_workers={FLAGS.num_workers}: must be >= 1")
  sys.exit(run_workers(argv[1:], FLAGS.num_workers, Path(FLAGS.worker_log_dir),
                       FLAGS.grace_seconds, FLAGS.intra_op_threads))


if __name__ == "__main__":
  define_flags()
  app.run(main)
