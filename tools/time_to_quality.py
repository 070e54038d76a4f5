"""Validation quality against training time, from a run's TensorBoard summaries.

  python tools/time_to_quality.py --model_dir=M1,M2 [--metric=ndcg@10]

For each model directory: the minutes from the first training summary to
each periodic evaluation, the metric there, and the minutes to reach 90%,
95% and 100% of the run's best. Evaluations are the valid split when the run
selected on it (--early_stopping_metric). Times include the evaluations and
are wall-clock: say whether the run had the cores to itself.
"""

from absl import app, flags

from trainer import train_lib

FLAGS = flags.FLAGS
flags.DEFINE_list("model_dir", None, "Trainer model directories.")
flags.DEFINE_string("metric", "ndcg@10", "Evaluation scalar to follow.")
flags.DEFINE_boolean("curve", False, "Also print every evaluation.")
flags.DEFINE_list("minutes", ["1", "2", "5", "10", "15", "20"],
                  "Budgets: the best value evaluated within each many minutes.")
flags.mark_flag_as_required("model_dir")

FRACTIONS = (0.9, 0.95, 1.0)


def minutes_to_quality(model_dir: str, metric: str) -> tuple[list[tuple[float, int, float]], dict]:
  """[(minutes, step, value)] of every evaluation, and {fraction: minutes to reach it}."""
  train = train_lib.summary_scalars(model_dir, "loss")
  evals = train_lib.summary_scalars(model_dir, metric, train_lib.EVAL_SUMMARIES)
  if not train or not evals:
    raise SystemExit(f"time_to_quality: {model_dir} has no train or {metric} summaries")
  start = min(wall for wall, _ in train.values())
  curve = [((wall - start) / 60.0, step, value) for step, (wall, value) in sorted(evals.items())]
  best = max(value for _, _, value in curve)
  reached = {f: next(m for m, _, v in curve if v >= f * best) for f in FRACTIONS}
  return curve, reached


def best_within(curve: list[tuple[float, int, float]], minutes: float) -> float | None:
  """The best value evaluated within `minutes` of the start (None: no evaluation yet)."""
  values = [value for m, _, value in curve if m <= minutes]
  return max(values) if values else None


def main(argv):
  del argv
  budgets = [float(m) for m in FLAGS.minutes]
  print("model_dir  best  best step  " + "  ".join(f"min to {f:.0%}" for f in FRACTIONS) +
        "".join(f"  best in {m:g} min" for m in budgets))
  for model_dir in FLAGS.model_dir:
    curve, reached = minutes_to_quality(model_dir, FLAGS.metric)
    best = max(curve, key=lambda c: c[2])
    within = [best_within(curve, m) for m in budgets]
    print(f"{model_dir}  {best[2]:.4f}  {best[1]}  " +
          "  ".join(f"{reached[f]:.1f}" for f in FRACTIONS) +
          "".join("  -" if v is None else f"  {v:.4f}" for v in within))
    if FLAGS.curve:
      for minutes, step, value in curve:
        print(f"  {minutes:7.2f} min  step {step:7d}  {FLAGS.metric} {value:.4f}")


if __name__ == "__main__":
  app.run(main)
