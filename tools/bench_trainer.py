"""Trainer throughput: input pipeline, training steps, strategies, notebooks.

  python tools/bench_trainer.py --positions_dir=P --windows_dir=W \
      [--recipe_windows_dir=R] [--seed_news_dir=N] [--steps=30]

P and W are preprocess outputs of the same log (ML-1M: --samples=positions
and --samples=windows, max_seq_len 50). N is the same log in the news schema
(../shared/bench/to_news_schema.py) for ../shared/bench/seed_baseline.py,
run here for one epoch so every ratio comes from one invocation of this tool.

Cases (each in its own process: logical CPU devices must be set before TF
starts):
  input         TrainReader alone: parsed examples/s, no model
  sasrec_nb     the notebooks' settings (batch 1024, emb 64, 2 blocks, ff 128,
                dropout 0.2, temperature 0.05, symmetric in-batch loss, L 50)
                on positions data: identical work per example to the notebook
  sasrec_win    the same model on windows data, a loss on all positions
                (--num_negatives pool): supervised targets/s
  sasrec_recipe configs/ml1m_sasrec.flags' model and loss (catalogue softmax,
                batch 64, no dropout) on R (windows of 200), only with R
  two_tower_nb  the notebooks' two-tower (batch 1024, emb 32, towers 128-64-32,
                L 30 in the notebook; here the data's L)
  *_mirrored2   the same over 2 logical CPUs (MirroredStrategy)
Rates are after 3 warm-up steps (tracing, XLA compilation excluded).
"""

import json
import os
import subprocess
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("positions_dir", None, "preprocess output, --samples=positions.")
flags.DEFINE_string("windows_dir", None, "preprocess output, --samples=windows.")
flags.DEFINE_string("seed_news_dir", "", "news-schema copy of the log for seed_baseline.py.")
flags.DEFINE_string("seed_script", "../shared/bench/seed_baseline.py", "The notebooks' script.")
flags.DEFINE_integer("steps", 30, "Timed steps per case.")
flags.DEFINE_string("case", "", "Internal: run one case in this process.")
flags.DEFINE_integer("num_negatives", 1024, "Pool for the all-position case.")
flags.DEFINE_string("recipe_windows_dir", "", "preprocess output of configs/ml1m_sasrec.flags.")
flags.DEFINE_integer("recipe_emb_dim", 64, "Embedding size of the sasrec_recipe case.")

NOTEBOOK_SASREC = dict(model="sasrec", batch_size=1024, emb_dim=64, num_heads=2, num_blocks=2,
                       ff_dim=128, dropout=0.2, temperature=0.05, symmetric_loss=True,
                       remove_accidental_hits=False, logq_correction=False)
NOTEBOOK_TWO_TOWER = dict(model="two_tower", batch_size=1024, emb_dim=32, tower_units=(128, 64),
                          dropout=0.1, temperature=0.05, symmetric_loss=True,
                          remove_accidental_hits=False, logq_correction=False)


def cases():
  w, p = FLAGS.windows_dir, FLAGS.positions_dir
  # Explicit dropout and loss: the figures predate the per-model defaults.
  sas_win = dict(model="sasrec", batch_size=128, num_negatives=FLAGS.num_negatives,
                 dropout=0.2, loss="in_batch")
  recipe = {}
  if FLAGS.recipe_windows_dir:
    recipe["sasrec_recipe"] = (FLAGS.recipe_windows_dir, dict(
        model="sasrec", batch_size=64, loss="softmax", dropout=0.0,
        emb_dim=FLAGS.recipe_emb_dim, ff_dim=2 * FLAGS.recipe_emb_dim))
  return recipe | {
      "input": (p, {}),
      "sasrec_nb": (p, NOTEBOOK_SASREC),
      "sasrec_win": (w, sas_win),
      "two_tower_nb": (p, NOTEBOOK_TWO_TOWER),
      "sasrec_win_mirrored2": (w, dict(sas_win, strategy="mirrored", num_cpu_replicas=2)),
      "two_tower_nb_mirrored2": (p, dict(NOTEBOOK_TWO_TOWER, strategy="mirrored",
                                         num_cpu_replicas=2)),
  }


def run_case(name: str) -> dict:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow as tf
  from contracts import manifest as mf
  from trainer import config as config_lib, input_pipeline, train_lib

  data_dir, overrides = cases()[name]
  manifest = mf.load(data_dir)
  if name == "input":
    steps = input_pipeline.steps_per_epoch(manifest, 1024, 1, 1)
    reader = input_pipeline.TrainReader(manifest, 1024, 1, steps)
    it = iter(reader())
    for _ in range(3):
      next(it)
    start = time.perf_counter()
    for _ in range(FLAGS.steps * 5):
      next(it)
    return {"examples_per_s": FLAGS.steps * 5 * 1024 / (time.perf_counter() - start)}
  config = config_lib.TrainerConfig(data_dir=data_dir, model_dir="/tmp/bench_trainer_unused",
                                    **overrides)
  trainer = train_lib.Trainer(config, manifest)
  loop = trainer._train_loop_function()
  reader = input_pipeline.TrainReader(manifest, config.batch_size, 1, trainer.steps_per_epoch)
  it = iter(trainer.strategy.distribute_datasets_from_function(reader))
  loop(it, tf.constant(3))
  start = time.perf_counter()
  loop(it, tf.constant(FLAGS.steps))
  seconds = (time.perf_counter() - start) / FLAGS.steps
  examples = config.batch_size / seconds
  result = {"ms_per_step": 1000 * seconds, "examples_per_s": examples}
  if manifest.samples == "windows":
    # Supervised (history, next item) pairs per window: its real positions.
    batch = next(iter(reader()))
    targets = float(tf.reduce_mean(tf.cast(batch["length"], tf.float32)))
    result["targets_per_s"] = examples * targets
  return result


def seed_rate(model: str) -> dict:
  out = f"/tmp/bench_trainer_seed_{model}.json"
  subprocess.run([sys.executable, FLAGS.seed_script, FLAGS.seed_news_dir, model, "--epochs", "1",
                  "--out", out], check=True, capture_output=True)
  result = json.loads(open(out).read())
  return {"examples_per_s": result["num_samples"] / result["seconds"]["train"],
          "num_samples": result["num_samples"], "train_s": result["seconds"]["train"]}


def main(argv):
  del argv
  if FLAGS.case:
    print(json.dumps(run_case(FLAGS.case)))
    return
  results = {}
  for name in cases():
    out = subprocess.run([sys.executable, __file__, f"--case={name}",
                          f"--positions_dir={FLAGS.positions_dir}",
                          f"--windows_dir={FLAGS.windows_dir}", f"--steps={FLAGS.steps}",
                          f"--num_negatives={FLAGS.num_negatives}",
                          f"--recipe_windows_dir={FLAGS.recipe_windows_dir}",
                          f"--recipe_emb_dim={FLAGS.recipe_emb_dim}"],
                         capture_output=True, text=True, check=True)
    results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    print(name, json.dumps(results[name]), flush=True)
  if FLAGS.seed_news_dir:
    for model in ("sasrec", "two_tower"):
      results[f"seed_{model}"] = seed_rate(model)
      print(f"seed_{model}", json.dumps(results[f"seed_{model}"]), flush=True)
  print(json.dumps(results))


if __name__ == "__main__":
  flags.mark_flags_as_required(["positions_dir", "windows_dir"])
  app.run(main)
