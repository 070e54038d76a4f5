"""Retrieval benchmarks: ANN speed/recall, FAISS vs numpy, candidate export vs the notebooks.

  python tools/bench_retrieval.py ann [--num_items=364047 --dim=64 --num_queries=10000]
  python tools/bench_retrieval.py export --data_dir=D --model_dir=M [--notebook_users=N]
  python tools/bench_retrieval.py synthetic_model --data_dir=D --model_dir=M

ann: item vectors from a mixture of 1,000 Gaussian clusters (unit centres,
noise of norm --noise, then L2-normalised; trained catalogues are clustered,
uniform random vectors are IVF's worst case), queries drawn from the same
mixture. Flat, IVF at several
nprobe, IVF-PQ and HNSW, top-100: queries/s (all cores) and recall@100
against Flat; then Flat against numpy (matrix product + argpartition) on
the same batch, and the matrix product alone in GFLOP/s.

export: the retrieval job (`retrieval --index=flat`, top-100, seen removed)
against the notebooks' export loop (seed_baseline.py: per-batch
`IdMap.transform` of histories, `utower.predict`, IndexIDMap2 Flat search at
depth topk + max_seq_len + 10, a Python loop per user and row) on the same
exported model and the same training histories. The loop runs on
`--notebook_users` users (all when 0).

synthetic_model: exports an untrained sasrec for D (speed only; the
notebooks' scale has no trained model).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
FLAGS = flags.FLAGS
flags.DEFINE_integer("num_items", 364_047, "ann: catalogue size (the notebooks' articles).")
flags.DEFINE_integer("dim", 64, "ann: vector size.")
flags.DEFINE_integer("num_queries", 10_000, "ann: queries.")
flags.DEFINE_integer("topk", 100, "Results per query.")
flags.DEFINE_float("noise", 0.5, "ann: noise norm around the unit cluster centres.")
flags.DEFINE_string("data_dir", None, "export: preprocess output.")
flags.DEFINE_string("model_dir", None, "export: trainer model_dir with export/.")
flags.DEFINE_string("work_dir", "/tmp/bench_retrieval", "Where job outputs go.")
flags.DEFINE_integer("notebook_users", 0, "export: users for the notebooks' loop (0: all).")
flags.DEFINE_integer("batch_size", 8192, "export: the job's --batch_size.")
flags.DEFINE_list("job_indexes", ["flat", "ivf"], "export: index types to run the job with.")
flags.DEFINE_string("seed_script_dir", "../shared/bench", "Where seed_baseline.py is.")


def mixture(n, dim, rng, centres):
  # Unit-norm centres plus noise of norm ~FLAGS.noise: 0 is 1,000 points,
  # large is uniform on the sphere (no structure for any index to use).
  x = centres[rng.integers(0, len(centres), n)] + \
      FLAGS.noise / np.sqrt(dim) * rng.normal(size=(n, dim))
  x = x.astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def bench_ann():
  import faiss
  from retrieval import index as index_lib
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(1000, FLAGS.dim))
  centres /= np.linalg.norm(centres, axis=1, keepdims=True)
  items = mixture(FLAGS.num_items, FLAGS.dim, rng, centres)
  queries = mixture(FLAGS.num_queries, FLAGS.dim, rng, centres)
  ids = np.arange(FLAGS.num_items, dtype=np.int64)
  k = FLAGS.topk

  def timed_search(index):
    start = time.perf_counter()
    _, labels = index.search(queries, k)
    return labels, FLAGS.num_queries / (time.perf_counter() - start)

  rows = []
  start = time.perf_counter()
  flat, _ = index_lib.build(items, ids, index_lib.IndexSpec("flat"))
  truth, flat_qps = timed_search(flat)
  rows.append(dict(index="flat", params="", build_s=time.perf_counter() - start, qps=flat_qps,
                   recall=1.0))

  def recall(labels):
    hits = [len(np.intersect1d(a, b)) for a, b in zip(labels, truth)]
    return float(np.mean(hits)) / k

  for kind, spec, settings in [
      ("ivf", index_lib.IndexSpec("ivf"), [dict(nprobe=p) for p in (8, 16, 32, 64, 128)]),
      ("ivf_pq", index_lib.IndexSpec("ivf_pq", pq_m=16), [dict(nprobe=p) for p in (32, 64)]),
      ("hnsw", index_lib.IndexSpec("hnsw"), [dict(ef_search=e) for e in (64, 128, 256)])]:
    start = time.perf_counter()
    index, resolved = index_lib.build(items, ids, spec)
    build_s = time.perf_counter() - start
    for setting in settings:
      params = index_lib.set_search_params(index, **setting)
      labels, qps = timed_search(index)
      rows.append(dict(index=kind, params=json.dumps(params), build_s=build_s, qps=qps,
                       recall=recall(labels), speedup=qps / flat_qps))
      print(json.dumps(rows[-1]), flush=True)

  # Flat against numpy on one batch: the same scores and top-k.
  batch = queries[:1024]
  start = time.perf_counter()
  flat.search(batch, k)
  faiss_s = time.perf_counter() - start
  start = time.perf_counter()
  scores = batch @ items.T
  matmul_s = time.perf_counter() - start
  np.argpartition(-scores, k, axis=1)[:, :k]
  numpy_s = time.perf_counter() - start
  gflop = 2 * len(batch) * FLAGS.num_items * FLAGS.dim / 1e9
  compare = dict(batch=len(batch), faiss_flat_s=faiss_s, numpy_matmul_topk_s=numpy_s,
                 numpy_matmul_only_s=matmul_s, gflop=gflop, numpy_matmul_gflops=gflop / matmul_s,
                 faiss_flat_gflops=gflop / faiss_s, threads=faiss.omp_get_max_threads())
  print(json.dumps(compare), flush=True)
  return {"rows": rows, "flat_vs_numpy": compare}


def notebook_export_loop(data_dir, model_dir, num_users):
  """The notebooks' export cell on our model: returns (users, seconds, rows)."""
  import faiss
  import pyarrow.parquet as pq
  import tensorflow as tf
  sys.path.insert(0, str(Path(FLAGS.seed_script_dir).resolve()))
  from seed_baseline import IdMap, pad_left  # the notebooks' own helpers
  from contracts import manifest as mf
  from contracts.export_manifest import load_info
  manifest = mf.load(data_dir)
  info = load_info(model_dir)
  items = pq.read_table(manifest.path(mf.ITEMS_FILE), columns=["item_id"]).column(0)
  raw_items = items.to_numpy(zero_copy_only=False)[1:].astype(np.int64)
  table = pq.read_table(manifest.path(mf.USER_HISTORIES_FILE), columns=["user", "user_id",
                                                                        "history"])
  history = table.column("history").to_pylist()
  user_hist = {int(u): [int(raw_items[i - 1]) for i in h]
               for u, h in zip(table.column("user_id").to_numpy(), history)}
  item_map = IdMap("article_id", np.sort(raw_items))
  # Our model's item rows are in vocabulary order; the notebooks' IdMap is
  # sorted by raw id: serve the same vectors under the same raw ids.
  vectors = np.load(Path(model_dir) / "export" / info.item_embeddings)[1:].astype("float32")
  index = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
  faiss.normalize_L2(vectors)
  index.add_with_ids(vectors, raw_items)
  tower = tf.saved_model.load(str(Path(model_dir) / "export" / info.user_tower))
  serve = tower.signatures["serving_default"]
  to_ours = np.zeros(item_map.vocab_size, np.int64)
  to_ours[item_map.transform(raw_items)] = np.arange(1, len(raw_items) + 1)
  max_len = manifest.max_seq_len
  user_index = dict(zip(table.column("user_id").to_numpy().tolist(),
                        table.column("user").to_numpy().tolist()))

  def user_vecs(users):
    seqs = [user_hist[u][-max_len:] for u in users]
    Xh = pad_left([item_map.transform(np.asarray(s, dtype=np.int64)).tolist() for s in seqs],
                  max_len)
    e = serve(history=tf.constant(to_ours[Xh]),
              user=tf.constant([user_index[u] for u in users], tf.int64))["vector"].numpy()
    e = e.astype("float32")
    faiss.normalize_L2(e)
    return e

  users_all = list(user_hist.keys())[:num_users or None]
  K = FLAGS.topk
  start = time.perf_counter()
  rows = []
  for s in range(0, len(users_all), 4096):
    ub = users_all[s:s + 4096]
    distances, labels = index.search(user_vecs(ub), K + max_len + 10)
    for li, u in enumerate(ub):
      hs = set(user_hist[u])
      rank = 0
      for it, sc in zip(labels[li].tolist(), distances[li].tolist()):
        if it < 0 or it in hs:
          continue
        rank += 1
        rows.append((u, int(it), float(sc), rank))
        if rank >= K:
          break
  return len(users_all), time.perf_counter() - start, len(rows)


def bench_export():
  results = {}
  users, seconds, rows = notebook_export_loop(FLAGS.data_dir, FLAGS.model_dir,
                                              FLAGS.notebook_users)
  nb = dict(users=users, seconds=seconds, users_per_s=users / seconds, rows=rows,
            missing_rows=users * FLAGS.topk - rows)
  print("notebook_loop", json.dumps(nb), flush=True)
  results["notebook_loop"] = nb
  for kind in FLAGS.job_indexes:
    out = Path(FLAGS.work_dir) / f"job_{kind}"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "retrieval.main", f"--data_dir={FLAGS.data_dir}",
                    f"--model_dir={FLAGS.model_dir}", f"--output_dir={out}", f"--index={kind}",
                    f"--topk={FLAGS.topk}", f"--batch_size={FLAGS.batch_size}", "--overwrite"],
                   check=True, capture_output=True)
    wall = time.perf_counter() - start
    m = json.loads((out / "metrics.json").read_text())
    ours = dict(users=m["users"], wall_s=wall, users_per_s_wall=m["users"] / wall,
                users_per_s_job=m["users_per_s"], queries_per_s=m["queries_per_s"],
                short=m["users_short_of_topk"], candidates=m["candidates"],
                hit_rate_10=m["hit_rate@10"], ann_recall=m.get(f"ann_recall@{FLAGS.topk}"),
                nprobe=m.get("nprobe"), nlist=m.get("nlist"),
                ratio_job=m["users_per_s"] / nb["users_per_s"],
                ratio_wall=m["users"] / wall / nb["users_per_s"])
    print(f"ours_{kind}", json.dumps(ours), flush=True)
    results[f"ours_{kind}"] = ours
  return results


def synthetic_model():
  from contracts import manifest as mf
  from trainer import config as config_lib, export, train_lib
  manifest = mf.load(FLAGS.data_dir)
  config = config_lib.TrainerConfig(data_dir=FLAGS.data_dir, model_dir=FLAGS.model_dir,
                                    model="sasrec")
  trainer = train_lib.Trainer(config, manifest)
  export.export(trainer.model, "sasrec", manifest, Path(FLAGS.model_dir), 0)


def main(argv):
  if len(argv) != 2 or argv[1] not in ("ann", "export", "synthetic_model"):
    sys.exit(__doc__)
  result = {"ann": bench_ann, "export": bench_export, "synthetic_model": synthetic_model}[argv[1]]()
  if result:
    print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
