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

  engines:   --engine_scales=1,4,16: the news-scale log and ML-1M (--ml1m, its
             users repeated under new ids, as a user,item,ts CSV) at each scale,
             through the default engine and --engine=ray (a local Ray on this
             machine's CPUs). --ray_object_store_bytes caps the object store of
             the runs at scales >= --cap_from_scale, so that they must spill.
             Peak memory here is the sum of the proportional set sizes (PSS:
             shared pages divided among the processes that map them) of the job's
             process tree (Ray's raylet, object store and workers included),
             sampled every 0.25 s, and so is the size of Ray's spill directory.

Peak RSS comes from wait4() (the largest process of the job). The figure to
compare with the notebooks is examples/s of the whole job (read, clean,
vocabularies, write), against seed_baseline.py's `build_samples` rate (which
only builds numpy arrays in memory). Results print as JSON lines; copy them
into BUILD_NOTES.md with this command line.
"""

import dataclasses
import json
import os
import re
import subprocess
import sys
import threading
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
flags.DEFINE_list("engine_scales", [], "The default engine against --engine=ray at these scales.")
flags.DEFINE_list("engine_logs", ["news", "ml1m"], "Which logs the engines case runs.")
flags.DEFINE_integer("ray_object_store_bytes", 256 << 20, "Object store of the capped Ray runs.")
flags.DEFINE_float("cap_from_scale", 16, "Cap the Ray object store from this scale on.")


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
  for scale in FLAGS.engine_scales:
    engines_case(work, float(scale))


def tree_memory(pid: int) -> float:
  """PSS (MB) of a process and all its descendants, from /proc (Linux)."""
  parents = {}
  for stat in Path("/proc").glob("[0-9]*/stat"):
    try:
      fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
      continue
    parents[int(stat.parent.name)] = int(fields[1])
  tree, frontier = {pid}, [pid]
  while frontier:
    parent = frontier.pop()
    for child in [p for p, pp in parents.items() if pp == parent and p not in tree]:
      tree.add(child)
      frontier.append(child)
  total_kb = 0
  for p in tree:
    try:
      for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
          total_kb += int(line.split()[1])
    except OSError:
      pass
  return total_kb / 1024


def timed_tree(args: list[str]) -> dict:
  """Wall time and peak process-tree PSS of one preprocess run."""
  cmd = [sys.executable, "-m", "preprocess.main", "--overwrite", *args, *FLAGS.extra_args]
  started = time.perf_counter()
  proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  peak, chunks = 0.0, []
  reader = threading.Thread(target=lambda: chunks.append(proc.stderr.read()), daemon=True)
  reader.start()
  spill_peak = 0
  while proc.poll() is None:
    peak = max(peak, tree_memory(proc.pid))
    spill_peak = max(spill_peak, spilled_bytes())
    time.sleep(0.25)
  wall = time.perf_counter() - started
  reader.join()
  stderr = "".join(chunks)
  if proc.returncode != 0:
    raise SystemExit(f"failed: {' '.join(cmd)}\n{stderr[-3000:]}")
  return {"wall_s": round(wall, 1), "peak_tree_pss_mb": round(peak),
          "peak_spilled_mb": round(spill_peak / 2**20), "stages_s": stage_times(stderr)}


def stage_times(log: str) -> dict[str, float]:
  """--engine=ray's progress lines -> seconds since the start at the end of each stage."""
  stages = {"read and cleaned": "clean", "vocabularies:": "vocabularies",
            "examples in": "shards", "wrote /": "all"}
  out = {}
  for line in log.splitlines():
    for marker, name in stages.items():
      found = re.search(r"\(?(?:in )?([0-9.]+)s\)?", line.split(marker, 1)[1]) \
          if marker in line and "ray_engine.py" in line else None
      if found:
        out[name] = float(found.group(1))
  return out


def spilled_bytes() -> int:
  """Bytes in the latest local Ray session's spill directories (Ray's default place)."""
  total = 0
  for directory in Path("/tmp/ray/session_latest").glob("ray_spilled_objects*"):
    try:
      total += sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
    except OSError:  # a file deleted while we looked
      pass
  return total


def ml1m_csv(work: Path, scale: float) -> Path:
  """ML-1M (sasrec_txt) with its users repeated `scale` times under new ids,
  as user,item,ts (ts: the click's position in its user's sequence)."""
  import numpy as np
  import pandas as pd
  path = work / f"ml1m_x{scale:g}.csv"
  if path.exists():
    return path
  log = pd.read_csv(FLAGS.ml1m, sep=" ", header=None, names=["user", "item"])
  log["ts"] = log.groupby("user").cumcount()
  copies = [log.assign(user=log.user + k * 10_000_000) for k in range(int(scale))]
  pd.concat(copies).to_csv(path, index=False)
  return path


def engines_case(work: Path, scale: float) -> None:
  inputs = {}
  if "news" in FLAGS.engine_logs:
    base = synthetic.PRESETS["news"]
    raw = work / f"news_x{scale:g}_raw"
    if not (raw / "train_click_log.csv").exists():
      synthetic.write(dataclasses.replace(base, num_users=int(base.num_users * scale)), raw,
                      overwrite=True)
    inputs["news"] = (["--source=news", f"--input={raw}"], raw / "train_click_log.csv")
  if "ml1m" in FLAGS.engine_logs and FLAGS.ml1m:
    path = ml1m_csv(work, scale)
    inputs["ml1m"] = (["--source=csv", f"--input={path}", "--user_col=user", "--item_col=item",
                       "--time_col=ts", "--holdout=valid_test"], path)
  for log, (args, clicks_file) in inputs.items():
    for engine in ("default", "ray"):
      extra = [f"--engine={engine}"]
      capped = engine == "ray" and scale >= FLAGS.cap_from_scale
      if capped:
        extra.append(f"--ray_object_store_bytes={FLAGS.ray_object_store_bytes}")
      out = work / f"{log}_x{scale:g}_{engine}"
      result = timed_tree(args + extra + [f"--output_dir={out}"])
      manifest = mf.load(out)
      examples = sum(s.num_examples for s in manifest.splits.values())
      result.update(case=f"{log}_x{scale:g}", engine=engine, clicks=manifest.counts["clicks"],
                    input_mb=round(clicks_file.stat().st_size / 2**20),
                    object_store_mb=FLAGS.ray_object_store_bytes >> 20 if capped else None,
                    examples=examples, examples_per_s=round(examples / result["wall_s"]),
                    args=" ".join(args + extra + FLAGS.extra_args))
      print(json.dumps(result), flush=True)


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
