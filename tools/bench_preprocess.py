"""Benchmark of the preprocess job: wall time, peak memory, examples/s.

  python tools/bench_preprocess.py --ml1m=../shared/data/ml-1m/ml-1m.txt.gz \
      --news_scales=0.25,0.5,1,2 --work_dir=/tmp/bench_pre

Cases:
  ml1m:      preprocess --source=sasrec_txt on the given file, both holdouts.
  news_xS:   the synthetic "news" preset (the notebooks' scale: 200k users,
             364k articles, 1.1M clicks) with S times the users, through
             --source=news; with --num_workers=1 as well, so peak RSS is the
             memory of one process (workers share the log copy-on-write).

  string_ids: the news-scale log (--news_scales' first scale, or 1) as one
             CSV twice: integer ids, and every user and item id turned into a
             10-character string, both through --source=csv in one invocation.

Peak RSS comes from wait4() (the largest process of the job). The figure to
compare with the notebooks is examples/s of the whole job (read, clean,
vocabularies, write), against seed_baseline.py's `build_samples` rate (which
only builds numpy arrays in memory). Results print as JSON lines; copy them
into BUILD_NOTES.md with this command line.
"""

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags

from contracts import manifest as mf
from preprocess import synthetic

FLAGS = flags.FLAGS
flags.DEFINE_string("ml1m", "", "ml-1m.txt.gz (sasrec_txt format); empty: skip.")
flags.DEFINE_list("news_scales", [], "Synthetic news-scale logs with these user multipliers.")
flags.DEFINE_string("work_dir", "/tmp/bench_preprocess", "Scratch directory.")
flags.DEFINE_list("extra_args", [], "Extra preprocess flags for every case.")
flags.DEFINE_boolean("string_ids", False, "Also the integer-id against string-id case.")


def timed_preprocess(args: list[str]) -> dict:
  cmd = [sys.executable, "-m", "preprocess.main", "--overwrite", *args, *FLAGS.extra_args]
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
  started = time.perf_counter()
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
  # wait4 reports the child's peak RSS; read pipes only after it exits (outputs are small).
  _, status, usage = os.wait4(proc.pid, 0)
  wall = time.perf_counter() - started
  stderr = proc.stderr.read().decode()
  if os.waitstatus_to_exitcode(status) != 0:
    raise SystemExit(f"failed: {' '.join(cmd)}\n{stderr[-2000:]}")
  return {"wall_s": round(wall, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
          "cpu_s": round(usage.ru_utime + usage.ru_stime, 2)}


def report(case: str, args: list[str], output_dir: Path) -> None:
  result = timed_preprocess(args + [f"--output_dir={output_dir}"])
  manifest = mf.load(output_dir)
  examples = sum(s.num_examples for s in manifest.splits.values())
  result.update(case=case, clicks=manifest.counts["clicks"], users=manifest.counts["users"],
                items=manifest.counts["items"], examples=examples,
                examples_per_s=round(examples / result["wall_s"]),
                args=" ".join(args + FLAGS.extra_args))
  print(json.dumps(result), flush=True)


def main(argv):
  del argv
  work = Path(FLAGS.work_dir)
  work.mkdir(parents=True, exist_ok=True)
  if FLAGS.ml1m:
    for holdout in ("last", "valid_test"):
      report(f"ml1m_{holdout}", ["--source=sasrec_txt", f"--input={FLAGS.ml1m}",
                                 f"--holdout={holdout}"], work / f"ml1m_{holdout}")
  for scale in FLAGS.news_scales:
    base = synthetic.PRESETS["news"]
    config = dataclasses.replace(base, num_users=int(base.num_users * float(scale)))
    raw = work / f"news_x{scale}_raw"
    if not (raw / "train_click_log.csv").exists():
      synthetic.write(config, raw, overwrite=True)
    for workers in ("0", "1"):
      report(f"news_x{scale}_workers{workers}",
             ["--source=news", f"--input={raw}", f"--num_workers={workers}"],
             work / f"news_x{scale}")
  if FLAGS.string_ids:
    string_id_case(work, float(FLAGS.news_scales[0]) if FLAGS.news_scales else 1.0)


def string_id_case(work: Path, scale: float) -> None:
  """The same clicks with int64 and with 10-character string ids (U000000080, N000000030)."""
  import numpy as np
  import pandas as pd
  base = synthetic.PRESETS["news"]
  raw = work / f"news_x{scale}_raw"
  if not (raw / "train_click_log.csv").exists():
    synthetic.write(dataclasses.replace(base, num_users=int(base.num_users * scale)), raw,
                    overwrite=True)
  clicks = pd.read_csv(raw / "train_click_log.csv",
                       usecols=["user_id", "click_article_id", "click_timestamp"])
  paths = {"int": work / "ids_int.csv", "string": work / "ids_string.csv"}
  clicks.to_csv(paths["int"], index=False)
  as_string = clicks.assign(
      user_id=np.char.add("U", np.char.zfill(clicks.user_id.to_numpy().astype(str), 9)),
      click_article_id=np.char.add(
          "N", np.char.zfill(clicks.click_article_id.to_numpy().astype(str), 9)))
  as_string.to_csv(paths["string"], index=False)
  for kind, path in paths.items():
    report(f"news_x{scale}_{kind}_ids",
           ["--source=csv", f"--input={path}", "--user_col=user_id",
            "--item_col=click_article_id", "--time_col=click_timestamp", "--time_unit=ms"],
           work / f"ids_{kind}")


if __name__ == "__main__":
  app.run(main)
