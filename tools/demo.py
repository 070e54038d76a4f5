"""`make demo`: the whole pipeline on the embedded synthetic data set.

  synthetic log (news schema) -> preprocess (windows, valid/test holdout)
  -> baselines -> trainer sasrec, two_tower -> retrieval (flat, ivf) of sasrec
  -> ranking data (sasrec's valid lists train the ranker, its test lists
     evaluate it) -> trainer dien -> reranked test lists and their metrics

Each stage runs the installed binary, as a user would. The data and settings
are chosen so that each stage shows what it adds (on the valid split; the
table is the test split): the `demo` preset interrupts threads with trending
clicks, which a first-order Markov chain cannot look past and sasrec can; the
IVF index probes a quarter of its lists; dien reranks sasrec's lists.
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
flags.DEFINE_integer("epochs", 10, "Trainer epochs per retrieval model.")
flags.DEFINE_integer("ranker_epochs", 2, "Trainer epochs of the dien ranker.")
# 4,000 items: 64 lists of ~62 (FAISS wants >= 39 to train each centroid);
# probing 16 kept ANN recall@100 at 0.92 on the valid split, 12 at 0.90, 8 at 0.86.
flags.DEFINE_integer("ivf_nlist", 64, "Lists of the IVF index.")
flags.DEFINE_integer("ivf_nprobe", 16, "Lists the IVF index searches per query.")

# What each row of the table ranks with.
ROW_NOTES = {
    "most_popular": "training clicks, no personalisation",
    "markov": "counts of the next click after the last click",
    "two_tower": "user id + mean of the history: no order",
    "sasrec": "self-attention over the last 20 clicks",
    "sasrec+flat": "exact top-100 from the retrieval job",
    "sasrec+ivf": "approximate top-100 (IVF)",
}

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
  started = time.perf_counter()
  work = Path(FLAGS.work_dir)
  raw, data = work / "raw", work / "data"
  steps = [
      ("synthetic log", [sys.executable, str(TOOLS / "make_synthetic.py"),
                         f"--preset={FLAGS.preset}", f"--output_dir={raw}", "--overwrite"]),
      ("preprocess", [binary("preprocess"), "--source=news", f"--input={raw}",
                      f"--output_dir={data}", "--holdout=valid_test", "--samples=windows",
                      "--max_seq_len=20", "--overwrite"]),
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

  trained = {}
  for model in ("sasrec", "two_tower"):
    model_dir = work / "models" / model
    if model_dir.exists():
      shutil.rmtree(model_dir)  # the demo trains from scratch every time
    result = stage(f"trainer {model}", [
        binary("trainer"), f"--model={model}", f"--data_dir={data}",
        f"--model_dir={model_dir}", f"--epochs={FLAGS.epochs}", "--eval_split=test"])
    if result.returncode != 0:
      sys.exit(f"demo: trainer {model} failed:\n{result.stderr[-2000:]}")
    trained[model] = json.loads((model_dir / "metrics.json").read_text())

  retrieved = {}
  for kind, split in (("flat", "test"), ("ivf", "test"), ("flat", "valid")):
    out = work / "retrieval" / f"{kind}_{split}"
    ivf_flags = [f"--nlist={FLAGS.ivf_nlist}", f"--nprobe={FLAGS.ivf_nprobe}"] \
        if kind == "ivf" else []
    result = stage(f"retrieval {kind} {split}", [
        binary("retrieval"), f"--data_dir={data}", f"--model_dir={work / 'models' / 'sasrec'}",
        f"--output_dir={out}", f"--index={kind}", *ivf_flags, f"--eval_split={split}",
        "--topk=100", "--overwrite"])
    if result.returncode != 0:
      sys.exit(f"demo: retrieval {kind} {split} failed:\n{result.stderr[-2000:]}")
    if split == "test":
      retrieved[f"sasrec+{kind}"] = json.loads((out / "metrics.json").read_text())

  ranking_data, ranker = work / "ranking_data", work / "models" / "dien"
  if ranker.exists():
    shutil.rmtree(ranker)
  for name, cmd in [
      ("ranking data", [binary("preprocess"), "--mode=ranking", f"--data_dir={data}",
                        f"--candidates={work / 'retrieval' / 'flat_valid'},"
                        f"{work / 'retrieval' / 'flat_test'}",
                        f"--output_dir={ranking_data}", "--overwrite"]),
      ("trainer dien", [binary("trainer"), "--model=dien", f"--data_dir={ranking_data}",
                        f"--model_dir={ranker}", f"--epochs={FLAGS.ranker_epochs}",
                        "--batch_size=512", "--emb_dim=32"])]:
    result = stage(name, cmd)
    if result.returncode != 0:
      sys.exit(f"demo: {name} failed:\n{result.stderr[-2000:]}")
  reranked = json.loads((ranker / "metrics.json").read_text())

  manifest = json.loads((data / "manifest.json").read_text())
  counts = manifest["counts"]
  print(f"\n== metrics (split test, full ranking over {counts['items']} items, seen removed)")
  print(f"   data: {counts['users']} users, {counts['items']} items, {counts['clicks']} clicks, "
        f"{counts['examples_train']} training examples")
  print(f"   {'model':<14}{'HR@10':>8}{'NDCG@10':>9}{'HR@50':>8}   ranks by")
  rows = [(name, baselines[name]) for name in ("most_popular", "markov")]
  rows += [(name, trained[name]) for name in ("two_tower", "sasrec")]
  rows += list(retrieved.items())
  for model, m in rows:
    print(f"   {model:<14}{m['hit_rate@10']:>8.4f}{m['ndcg@10']:>9.4f}{m['hit_rate@50']:>8.4f}"
          f"   {ROW_NOTES[model]}")
  flat, ivf = retrieved["sasrec+flat"], retrieved["sasrec+ivf"]
  print(f"   (sasrec+flat/ivf: top-100 candidates written for {ivf['users']} users by the "
        f"retrieval job)")
  speedup = ivf["queries_per_s"] / flat["queries_per_s"]
  print(f"\n== IVF against Flat: {ivf['nprobe']} of {ivf['nlist']} lists searched per query, "
        f"ANN recall@100 {ivf['ann_recall@100']:.3f} (the exact top-100's share found, "
        f"{ivf['ann_recall_users']} users), search {speedup:.1f}x as fast "
        f"({ivf['queries_per_s']:,.0f} against {flat['queries_per_s']:,.0f} queries/s)")
  print(f"\n== ranking: dien reranks sasrec's top-100 test lists ({reranked['num_users']} users, "
        f"{reranked['num_users_with_positive']} with the test click among the candidates)")
  print(f"   {'order':<14}{'AUC':>8}{'GAUC':>8}{'HR@5':>8}{'NDCG@5':>8}{'NDCG@10':>9}")
  for name, prefix in (("retrieval", "retrieval_"), ("dien rerank", "")):
    print(f"   {name:<14}{reranked[prefix + 'auc']:>8.4f}{reranked[prefix + 'gauc']:>8.4f}"
          f"{reranked[prefix + 'hit_rate@5']:>8.4f}{reranked[prefix + 'ndcg@5']:>8.4f}"
          f"{reranked[prefix + 'ndcg@10']:>9.4f}")
  print(f"   (reranked lists: {ranker / 'reranked_candidates.parquet'})")
  print(f"\n== demo finished in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
  app.run(main)
