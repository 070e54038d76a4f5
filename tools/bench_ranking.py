"""The ranking stage: time to build ranking data, ranker training throughput.

  python tools/bench_ranking.py --data_dir=DATA --candidates=CANDS_VALID,CANDS_TEST \
      --work_dir=/tmp/bench_ranking [--steps=30]

DATA is a preprocess output, the candidates the retrieval job's valid and
test lists of one model (see README "Ranking"). Steps:
  build         preprocess --mode=ranking in this process: wall seconds and
                examples/s written (features + TFRecords)
  dien_*        the ranker's training step (batch 256, emb 32, GRU 32, history
                30) per variant, XLA on and off: examples/s after warm-up, and
                the seconds of the first call (tracing + XLA compilation)
Each training case runs in its own process.
"""

import json
import os
import subprocess
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "preprocess output the candidates were made from.")
flags.DEFINE_list("candidates", None, "retrieval output dirs (valid and test lists).")
flags.DEFINE_string("work_dir", "/tmp/bench_ranking", "Where the ranking data is written.")
flags.DEFINE_integer("steps", 30, "Timed steps per training case.")
flags.DEFINE_string("case", "", "Internal: run one training case in this process.")

MODEL = dict(model="dien", batch_size=256, emb_dim=32, gru_units=32)
CASES = {
    "dien_aigru_xla": dict(evolution="aigru", jit_compile=True),
    "dien_aigru": dict(evolution="aigru", jit_compile=False),
    "dien_augru_aux_xla": dict(evolution="augru", aux_loss_weight=1.0, jit_compile=True),
    "dien_augru_aux": dict(evolution="augru", aux_loss_weight=1.0, jit_compile=False),
}


def run_case(name: str) -> dict:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow as tf

  from contracts import manifest as mf
  from trainer import config as config_lib, input_pipeline, train_lib

  data_dir = os.path.join(FLAGS.work_dir, "data")
  manifest = mf.load_ranking(data_dir)
  config = config_lib.TrainerConfig(data_dir=data_dir, model_dir="/tmp/bench_ranking_unused",
                                    **MODEL, **CASES[name])
  trainer = train_lib.Trainer(config, manifest)
  loop = trainer._train_loop_function()
  reader = input_pipeline.TrainReader(manifest, config.batch_size, 1, trainer.steps_per_epoch)
  it = iter(trainer.strategy.distribute_datasets_from_function(reader))
  start = time.perf_counter()
  loop(it, tf.constant(1))
  first = time.perf_counter() - start
  loop(it, tf.constant(3))
  start = time.perf_counter()
  loop(it, tf.constant(FLAGS.steps))
  seconds = (time.perf_counter() - start) / FLAGS.steps
  return {"first_call_s": first, "ms_per_step": 1000 * seconds,
          "examples_per_s": config.batch_size / seconds}


def build() -> dict:
  from preprocess import ranking
  started = time.perf_counter()
  manifest = ranking.run(ranking.RankingConfig(
      data_dir=FLAGS.data_dir, candidates=tuple(FLAGS.candidates),
      output_dir=os.path.join(FLAGS.work_dir, "data"), overwrite=True))
  seconds = time.perf_counter() - started
  examples = manifest.counts["examples_train"] + manifest.counts["examples_eval"]
  return {"seconds": seconds, "examples": examples, "examples_per_s": examples / seconds,
          **manifest.counts}


def main(argv):
  del argv
  if FLAGS.case:
    print(json.dumps(run_case(FLAGS.case)))
    return
  results = {"build": build()}
  print("build", json.dumps(results["build"]), flush=True)
  for name in CASES:
    out = subprocess.run([sys.executable, __file__, f"--case={name}",
                          f"--work_dir={FLAGS.work_dir}", f"--steps={FLAGS.steps}",
                          f"--data_dir={FLAGS.data_dir}",
                          f"--candidates={','.join(FLAGS.candidates)}"],
                         capture_output=True, text=True, check=True)
    results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    print(name, json.dumps(results[name]), flush=True)
  print(json.dumps(results))


if __name__ == "__main__":
  flags.mark_flags_as_required(["data_dir", "candidates"])
  app.run(main)
