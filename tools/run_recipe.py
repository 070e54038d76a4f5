"""Runs a recipe end to end with N seeds: preprocess -> trainer -> evaluation.

  python tools/run_recipe.py --recipe=configs/ml1m_sasrec.flags --seeds=1,2,3 \
      --work_dir=build/recipes/ml1m_sasrec

A recipe is a trainer flagfile (`trainer --flagfile=...`) whose header names
the data it needs in one comment line:

  # preprocess: --source=sasrec_txt --input=$DATA/ml-1m/ml-1m.txt.gz ...

`$DATA` is --data_root (default ../shared/data, beside the repository). The
data is preprocessed once into WORK/data (reused while the preprocess flags
are the same), then every seed trains in WORK/seed_S. The trainer evaluates
every held-out split at the end, so one run gives the validation metrics
(to choose on) and the test metrics (to report); this prints them per seed
with their mean and sample standard deviation, and writes WORK/summary.json.
Flags after `--` go to every trainer run and override the recipe's (for
ablations: `-- --loss=in_batch`). --preprocess replaces the recipe's data
line, to run a recipe unchanged on another data set:

  python tools/run_recipe.py --recipe=configs/beauty_sasrec.flags --work_dir=W \
      --preprocess="--source=sasrec_txt --input=yelp.txt --holdout=valid_test ..." A seed whose metrics.json exists is not
retrained (delete WORK/seed_S to redo it).

A second evaluation protocol of the same trained models, for example the
SASRec paper's 100 sampled negatives, is an optional header line:

  # also evaluate: --eval_negatives=100

Each seed's model is then evaluated again by `trainer --mode=eval` (the
checkpoint the run exported, with those flags) into WORK/seed_S_also.json;
those metrics are summarised in a second table (summary.json
"also_evaluated").
"""

import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags

from contracts.fileio import write_json_atomic
from contracts.model_layout import METRICS_FILE

FLAGS = flags.FLAGS
flags.DEFINE_string("recipe", None, "Trainer flagfile with a `# preprocess:` header line.")
flags.DEFINE_list("seeds", ["1", "2", "3"], "Trainer seeds, one run each.")
flags.DEFINE_string("work_dir", None, "Data and one model directory per seed go here.")
flags.DEFINE_string("data_root", str(Path(__file__).resolve().parents[1].parent / "shared" /
                                     "data"), "What $DATA stands for in the recipe.")
flags.DEFINE_string("preprocess", None, "preprocess flags to use instead of the recipe's "
                    "`# preprocess:` line (the recipe's trainer flags on other data).")
flags.DEFINE_list("metrics", ["hit_rate@10", "ndcg@10", "hit_rate@20", "ndcg@20",
                              "hit_rate@50", "ndcg@50"], "Metrics to summarise.")
flags.mark_flags_as_required(["recipe", "work_dir"])

PREPROCESS_TAG = "# preprocess:"
ALSO_EVALUATE_TAG = "# also evaluate:"
SUMMARY_FILE = "summary.json"


class RecipeError(Exception):
  pass


def _header_lines(recipe: Path, tag: str) -> list[str]:
  return [line[len(tag):] for line in recipe.read_text().splitlines() if line.startswith(tag)]


def preprocess_flags(recipe: Path, data_root: str, replacement: str | None = None) -> list[str]:
  """The `# preprocess:` header line of the recipe (or `replacement`), with
  $DATA substituted."""
  lines = _header_lines(recipe, PREPROCESS_TAG)
  if len(lines) != 1:
    raise RecipeError(f"{recipe}: needs exactly one '{PREPROCESS_TAG} FLAGS' line, "
                      f"found {len(lines)}")
  line = lines[0] if replacement is None else replacement
  args = shlex.split(line.replace("$DATA", data_root))
  if not args:
    raise RecipeError("--preprocess: names no preprocess flags")
  for arg in args:
    if arg.split("=", 1)[0] in ("--output_dir", "--overwrite"):
      raise RecipeError(f"{'--preprocess' if replacement else recipe}: {arg} is set by "
                        "run_recipe.py, not by the recipe")
  return args


def also_evaluate_flags(recipe: Path) -> list[str] | None:
  """The optional `# also evaluate:` trainer flags (None without that line)."""
  lines = _header_lines(recipe, ALSO_EVALUATE_TAG)
  if len(lines) > 1:
    raise RecipeError(f"{recipe}: at most one '{ALSO_EVALUATE_TAG} FLAGS' line, "
                      f"found {len(lines)}")
  if not lines:
    return None
  args = shlex.split(lines[0])
  if not args:
    raise RecipeError(f"{recipe}: '{ALSO_EVALUATE_TAG}' names no trainer flags")
  return args


def mean_and_spread(values: list[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for a single value)."""
  a = np.asarray(values, dtype=np.float64)
  return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def summarize(runs: dict[int, dict], metric_names: list[str]) -> dict:
  """{"splits": {split: {metric: {"mean", "std", "values"}}}, "train_seconds": ...}."""
  summary: dict = {"seeds": sorted(runs), "splits": {}}
  splits = sorted({s for m in runs.values() for s in m["by_split"]}, key=_split_order)
  for split in splits:
    summary["splits"][split] = {}
    for name in metric_names:
      missing = [seed for seed in sorted(runs) if name not in runs[seed]["by_split"][split]]
      if missing:
        raise RecipeError(f"--metrics: {name!r} is not among the {split} metrics of seed "
                          f"{missing[0]} (see its metrics.json; --eval_topk sets the cut-offs)")
      values = [runs[seed]["by_split"][split][name] for seed in sorted(runs)]
      mean, std = mean_and_spread(values)
      summary["splits"][split][name] = {"mean": mean, "std": std, "values": values}
  seconds = [runs[seed].get("train_seconds", float("nan")) for seed in sorted(runs)]
  mean, std = mean_and_spread(seconds)
  summary["train_seconds"] = {"mean": mean, "std": std, "values": seconds}
  return summary


def _split_order(split: str) -> tuple:
  return ({"valid": 0, "test": 1}.get(split, 2), split)


def format_table(summary: dict, metric_names: list[str]) -> str:
  """Per seed and mean±sd rows; a train-seconds column when the summary has one."""
  seconds = summary.get("train_seconds")
  header = ["split", "seed"] + metric_names + (["train s"] if seconds else [])
  rows = []
  for split, by_metric in summary["splits"].items():
    for i, seed in enumerate(summary["seeds"]):
      rows.append([split, str(seed)] +
                  [f"{by_metric[m]['values'][i]:.4f}" for m in metric_names] +
                  ([f"{seconds['values'][i]:.0f}"] if seconds else []))
    rows.append([split, "mean±sd"] +
                [f"{by_metric[m]['mean']:.4f}±{by_metric[m]['std']:.4f}"
                 for m in metric_names] +
                ([f"{seconds['mean']:.0f}±{seconds['std']:.0f}"] if seconds else []))
  widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [header] + rows)


def _run(cmd: list[str], log: Path) -> None:
  print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
  started = time.perf_counter()
  with open(log, "w") as out:
    code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode
  if code != 0:
    tail = "\n".join(log.read_text().splitlines()[-15:])
    raise RecipeError(f"exit {code} after {time.perf_counter() - started:.0f}s; "
                      f"log {log}:\n{tail}")
  print(f"  done in {time.perf_counter() - started:.0f}s (log {log})", flush=True)


def _binary(name: str) -> list[str]:
  # The installed entry point, or the module from this checkout.
  path = shutil.which(name)
  return [path] if path else [sys.executable, "-m", f"{name}.main"]


def _metrics(model_dir: Path) -> dict:
  metrics_file = model_dir / METRICS_FILE
  metrics = json.loads(metrics_file.read_text())
  if "by_split" not in metrics:
    raise RecipeError(f"{metrics_file}: no by_split metrics (a ranking model's run?)")
  return metrics


def _run_trainer(recipe: Path, data: Path, model_dir: Path, seed: int, trainer_flags: list[str],
                 log: Path) -> dict:
  """Trains (or resumes) one seed unless model_dir already has its metrics;
  returns them."""
  if not (model_dir / METRICS_FILE).is_file():
    _run(_binary("trainer") + [f"--flagfile={recipe}", f"--data_dir={data}",
                               f"--model_dir={model_dir}", f"--seed={seed}"] + trainer_flags,
         log)
  return _metrics(model_dir)


def _evaluate_again(model_dir: Path, out: Path, trainer_flags: list[str], log: Path) -> dict:
  """The run's chosen checkpoint evaluated with other flags into `out` (the
  run's own metrics.json stays as it is)."""
  if not out.is_file():
    _run(_binary("trainer") + ["--mode=eval", f"--model_dir={model_dir}",
                               f"--eval_metrics_file={out}"] + trainer_flags, log)
  return json.loads(out.read_text())


def main(argv):
  extra = argv[1:]
  recipe = Path(FLAGS.recipe)
  work = Path(FLAGS.work_dir)
  try:
    if not recipe.is_file():
      raise RecipeError(f"--recipe={recipe}: no such file")
    seeds = [int(s) for s in FLAGS.seeds]
    pre_args = preprocess_flags(recipe, FLAGS.data_root, FLAGS.preprocess)
    also_args = also_evaluate_flags(recipe)
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    stamp = work / "preprocess_flags.json"
    if not (data / "manifest.json").is_file() or not stamp.is_file() or \
        json.loads(stamp.read_text()) != pre_args:
      _run(_binary("preprocess") + pre_args + [f"--output_dir={data}", "--overwrite"],
           work / "preprocess.log")
      write_json_atomic(stamp, pre_args)
    runs, also_runs = {}, {}
    for seed in seeds:
      model_dir = work / f"seed_{seed}"
      runs[seed] = _run_trainer(recipe, data, model_dir, seed, extra, work / f"seed_{seed}.log")
      if also_args is not None:
        # The overrides first: the protocol's flags are what this evaluation is.
        also_runs[seed] = _evaluate_again(model_dir, work / f"seed_{seed}_also.json",
                                          extra + also_args, work / f"seed_{seed}_also.log")
    summary = summarize(runs, FLAGS.metrics)
    if also_args is not None:
      also = summarize(also_runs, FLAGS.metrics)
      also.pop("train_seconds")  # an evaluation has none
      summary["also_evaluated"] = {"flags": also_args, **also}
  except (RecipeError, ValueError) as e:
    sys.exit(f"run_recipe: {e}")
  summary.update(recipe=str(recipe), preprocess=pre_args, trainer_overrides=extra)
  write_json_atomic(work / SUMMARY_FILE, summary)
  print(format_table(summary, FLAGS.metrics))
  if also_args is not None:
    print(f"\nalso evaluated ({' '.join(also_args)}), the same models:")
    print(format_table(summary["also_evaluated"], FLAGS.metrics))


if __name__ == "__main__":
  app.run(main)
