"""retrieval: FAISS index over the item tower, top-K candidates per user, metrics.

  retrieval --data_dir=DATA --model_dir=MODEL --output_dir=OUT [--index=ivf]
      [--num_workers=N --worker_index=W]
  retrieval ... --engine=ray --num_workers=64 [--ray_address=HOST:6379] [--num_gpus=1]

See retrieval/job.py for the output layout and the evaluation protocol, and
retrieval/ray_engine.py for the Ray engine.
"""

import functools
import os

from absl import app, flags, logging

from contracts import cli
from contracts.errors import ConfigError, DataError
from retrieval import index as index_lib
from retrieval import job

_D = job.RetrievalConfig(data_dir="", model_dir="", output_dir="")
FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "preprocess output directory (its manifest).")
flags.DEFINE_string("model_dir", None, "trainer model_dir holding export/.")
flags.DEFINE_string("output_dir", None, "Where the index, candidates and metrics go.")
flags.DEFINE_enum("index", _D.index, list(index_lib.INDEX_TYPES), "FAISS index type.")
flags.DEFINE_integer("nlist", _D.nlist, "IVF lists (0: ~4 sqrt(items), >= 39 items per list).")
flags.DEFINE_integer("nprobe", _D.nprobe,
                     "IVF lists searched (0: enough for ~max(items / 16, 100 topk) items).")
flags.DEFINE_integer("pq_m", _D.pq_m, "ivf_pq: sub-quantisers (must divide the embedding size).")
flags.DEFINE_integer("hnsw_m", _D.hnsw_m, "hnsw: neighbours per node.")
flags.DEFINE_integer("ef_search", _D.ef_search, "hnsw: search depth (0: max(128, 2 topk)).")
flags.DEFINE_integer("topk", _D.topk, "Candidates per user.")
flags.DEFINE_integer("batch_size", _D.batch_size, "Users per batch (and per part file).")
flags.DEFINE_boolean("exclude_seen", _D.exclude_seen, "Remove each user's clicked items.")
flags.DEFINE_enum("eval_split", _D.eval_split, ["valid", "test", job.EVAL_NONE],
                  "Query histories and targets: valid = training clicks (the notebooks' "
                  "export), test = + the validation click, none = every click, no metrics.")
flags.DEFINE_list("eval_topk", None, "HitRate/NDCG cut-offs (<= topk; default: those of "
                  f"{','.join(map(str, job.DEFAULT_EVAL_TOPK))} that are <= topk, else topk).")
flags.DEFINE_integer("ann_recall_users", _D.ann_recall_users,
                     "Users also searched exactly to measure ANN recall (non-flat indexes).")
flags.DEFINE_integer("num_workers", _D.num_workers, "Shares of the users: processes of the default "
                     "engine (each runs one), or what --engine=ray hands to its actors.")
flags.DEFINE_integer("worker_index", _D.worker_index, "This process's share (0-based).")
flags.DEFINE_integer("threads", _D.threads, "FAISS OpenMP threads (0: FAISS default).")
flags.DEFINE_boolean("overwrite", _D.overwrite, "Replace another retrieval job's output in "
                     "--output_dir (only the files retrieval writes are deleted).")
cli.define_engine_flags("this process runs share --worker_index of --num_workers",
                        "a Ray cluster runs every share")
flags.DEFINE_integer("num_actors", 0, "--engine=ray: actors, each loading the tower and index "
                     "once (0: the cluster's CPUs / --cpus_per_worker).")
flags.DEFINE_integer("cpus_per_worker", 1, "--engine=ray: CPUs (FAISS and TF threads) per actor.")
flags.DEFINE_float("num_gpus", 0.0, "--engine=ray: GPUs per actor (the user tower runs on it).")


fail = functools.partial(cli.fail, "retrieval")


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}", 2)
  for name in ("data_dir", "model_dir", "output_dir"):
    if not getattr(FLAGS, name):
      fail(f"--{name} is required", 2)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  try:
    config = job.RetrievalConfig(**{
        field: getattr(FLAGS, field) for field in job.RetrievalConfig.__dataclass_fields__
        if field != "eval_topk"}, eval_topk=cli.int_tuple(FLAGS.eval_topk or [], "eval_topk"))
    if FLAGS.engine == "ray":
      from retrieval import ray_engine  # pylint: disable=import-outside-toplevel
      result = ray_engine.run(config, FLAGS.ray_address, FLAGS.num_actors,
                              FLAGS.cpus_per_worker, FLAGS.num_gpus)
    else:
      result = job.run(config)
  except ConfigError as e:
    fail(str(e), 2)
  except DataError as e:
    fail(str(e), 1)
  if not result:
    print(f"retrieval: worker {config.worker_index} done; metrics when all "
          f"{config.num_workers} have finished")
    return
  line = f"retrieval: {result['users']} users, {result['candidates']} candidates"
  if config.eval_split != job.EVAL_NONE:
    k = min(config.eval_topk)
    line += (f", {config.eval_split} HR@{k} {result[f'hit_rate@{k}']:.4f} "
             f"NDCG@{k} {result[f'ndcg@{k}']:.4f}")
  ann = result.get(f"ann_recall@{config.topk}")
  if ann is not None:
    line += f", ANN recall@{config.topk} {ann:.4f}"
  print(f"{line} ({config.output_dir}/{job.METRICS_FILE})")


def run():
  logging.set_verbosity(logging.INFO)
  app.run(main)


if __name__ == "__main__":
  run()
