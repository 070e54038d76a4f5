"""`make demo`: the whole pipeline on the embedded synthetic data set.

  synthetic log (news schema) -> preprocess -> baselines -> trainer -> retrieval

Each stage runs the installed binary, as a user would. Stages whose job is
not implemented yet are reported as skipped, with the reason, never faked.
"""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("work_dir", "build/demo", "Where the demo writes (replaced on each run).")
flags.DEFINE_string("preset", "demo", "Synthetic preset (see preprocess/synthetic.py).")

TOOLS = Path(__file__).resolve().parent


def stage(name: str, cmd: list[str]) -> subprocess.CompletedProcess:
  print(f"\n== {name}: {' '.join(cmd)}", flush=True)
  started = time.perf_counter()
  result = subprocess.run(cmd, capture_output=True, text=True)
  tail = (result.stdout.strip().splitlines() or [""])[-1]
  print(f"   {'ok' if result.returncode == 0 else 'exit ' + str(result.returncode)} in "
        f"{time.perf_counter() - started:.1f}s  {tail[:200]}", flush=True)
  return result


def binary(name: str) -> str:
  path = shutil.which(name)
  if path is None:
    sys.exit(f"demo: `{name}` is not on PATH; run `make demo` (it installs the project)")
  return path


def main(argv):
  del argv
  work = Path(FLAGS.work_dir)
  raw, data = work / "raw", work / "data"
  steps = [
      ("synthetic log", [sys.executable, str(TOOLS / "make_synthetic.py"),
                         f"--preset={FLAGS.preset}", f"--output_dir={raw}", "--overwrite"]),
      ("preprocess", [binary("preprocess"), "--source=news", f"--input={raw}",
                      f"--output_dir={data}", "--holdout=valid_test", "--overwrite"]),
  ]
  for name, cmd in steps:
    result = stage(name, cmd)
    if result.returncode != 0:
      sys.exit(f"demo: {name} failed:\n{result.stderr[-2000:]}")

  result = stage("baselines", [sys.executable, str(TOOLS / "baselines.py"),
                               f"--data_dir={data}", "--split=test"])
  if result.returncode != 0:
    sys.exit(f"demo: baselines failed:\n{result.stderr[-2000:]}")
  baselines = json.loads(result.stdout)

  skipped = []
  for job in ("trainer", "retrieval"):
    result = stage(job, [binary(job), f"--data_dir={data}"])
    if result.returncode != 0 and "not implemented yet" in result.stderr:
      skipped.append(f"{job}: skipped, {result.stderr.strip()}")
    elif result.returncode != 0:
      sys.exit(f"demo: {job} failed:\n{result.stderr[-2000:]}")

  manifest = json.loads((data / "manifest.json").read_text())
  counts = manifest["counts"]
  print(f"\n== metrics (split test, full ranking over {counts['items']} items, seen removed)")
  print(f"   data: {counts['users']} users, {counts['items']} items, {counts['clicks']} clicks, "
        f"{counts['examples_train']} training examples")
  print(f"   {'model':<14}{'HR@10':>8}{'NDCG@10':>9}{'HR@50':>8}")
  for model in ("most_popular", "markov"):
    m = baselines[model]
    print(f"   {model:<14}{m['hit_rate@10']:>8.4f}{m['ndcg@10']:>9.4f}{m['hit_rate@50']:>8.4f}")
  for line in skipped:
    print(f"   {line}")


if __name__ == "__main__":
  app.run(main)
