"""The retrieval job: index, seen-excluding search, candidate parts, workers, resume."""

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time

import faiss
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from contracts import locks
from contracts import metrics
from contracts.errors import ConfigError, DataError
from contracts.vocab import Vocabulary
from retrieval import index as index_lib
from retrieval import job
from retrieval import output as output_lib
from retrieval import search as search_lib


def brute_force(queries, vectors, seen_lists, topk):
  """Reference: score every item (index i = row i - 1 of vectors), drop seen, sort."""
  normed = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
  scores = queries @ normed.T
  out = []
  for row, seen in zip(scores, seen_lists):
    order = [i + 1 for i in np.argsort(-row, kind="stable") if i + 1 not in set(seen)]
    out.append(order[:topk])
  return out


def random_case(num_items=300, dim=8, num_users=40, seed=0):
  rng = np.random.default_rng(seed)
  vectors = rng.normal(size=(num_items, dim)).astype(np.float32)
  queries = rng.normal(size=(num_users, dim)).astype(np.float32)
  queries /= np.linalg.norm(queries, axis=1, keepdims=True)
  lengths = rng.integers(0, 30, num_users)
  lengths[3] = 250  # longer than topk + max_seq_len + 10 of the notebooks (10 + 50 + 10)
  lengths[5] = 0
  seen = [rng.choice(np.arange(1, num_items + 1), n, replace=False) for n in lengths]
  offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  values = np.concatenate(seen).astype(np.int64)
  raw_ids = 1000 + 7 * np.arange(num_items)  # raw id of item index i: raw_ids[i - 1]
  return vectors, queries, seen, values, offsets, raw_ids


def test_flat_search_excluding_seen_equals_brute_force():
  vectors, queries, seen, values, offsets, raw_ids = random_case()
  index, _ = index_lib.build(vectors, raw_ids, index_lib.IndexSpec("flat"))
  result = search_lib.search_unseen(index, Vocabulary(raw_ids), queries, values,
                                    offsets, topk=10)
  expected = brute_force(queries, vectors, seen, 10)
  assert result.items.tolist() == expected
  assert (result.counts == 10).all()  # the 250-click user still gets 10
  assert not np.isin(result.items[3], seen[3]).any()


def test_dense_exact_search_equals_brute_force_and_faiss_flat():
  vectors, queries, seen, values, offsets, raw_ids = random_case()
  normed = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
  dense = search_lib.search_unseen_dense(normed, queries, values, offsets, topk=10,
                                         rows_per_product=7)  # several products
  assert dense.items.tolist() == brute_force(queries, vectors, seen, 10)
  index, _ = index_lib.build(vectors, raw_ids, index_lib.IndexSpec("flat"))
  faiss_result = search_lib.search_unseen(index, Vocabulary(raw_ids), queries, values,
                                          offsets, topk=10)
  np.testing.assert_allclose(dense.scores, faiss_result.scores, rtol=1e-5)
  # A user with 5 unseen items left gets those 5 and padding.
  few = search_lib.search_unseen_dense(normed[:30], queries[:1], np.arange(1, 26),
                                       np.array([0, 25]), topk=10)
  assert few.counts.tolist() == [5] and sorted(few.items[0, :5]) == [26, 27, 28, 29, 30]


def test_user_who_has_seen_almost_everything_gets_what_is_left():
  vectors, queries, seen, values, offsets, raw_ids = random_case(num_items=300, num_users=6)
  seen = [np.arange(1, 26), np.arange(1, 3)]  # user 0 has 5 unseen items left
  values = np.concatenate(seen).astype(np.int64)
  offsets = np.array([0, 25, 27], np.int64)
  vectors, raw_ids = vectors[:30], raw_ids[:30]
  index, _ = index_lib.build(vectors, raw_ids, index_lib.IndexSpec("flat"))
  result = search_lib.search_unseen(index, Vocabulary(raw_ids), queries[:2], values,
                                    offsets, topk=10)
  assert result.counts.tolist() == [5, 10]
  assert sorted(result.items[0, :5]) == [26, 27, 28, 29, 30]
  assert (result.items[0, 5:] == 0).all() and np.isneginf(result.scores[0, 5:]).all()


def test_ivf_with_every_list_probed_equals_flat():
  vectors, queries, seen, values, offsets, raw_ids = random_case(num_items=2000, dim=16)
  ids = Vocabulary(raw_ids)
  flat, _ = index_lib.build(vectors, raw_ids, index_lib.IndexSpec("flat"))
  ivf, spec = index_lib.build(vectors, raw_ids, index_lib.IndexSpec("ivf", nlist=20))
  assert spec.nlist == 20
  index_lib.set_search_params(ivf, nprobe=20)
  a = search_lib.search_unseen(flat, ids, queries, values, offsets, topk=25)
  b = search_lib.search_unseen(ivf, ids, queries, values, offsets, topk=25)
  np.testing.assert_array_equal(a.items, b.items)
  np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5)


def test_ivf_rows_left_short_are_searched_again():
  vectors, queries, seen, values, offsets, raw_ids = random_case(num_items=2000, dim=16)
  ivf, _ = index_lib.build(vectors, raw_ids, index_lib.IndexSpec("ivf", nlist=50))
  index_lib.set_search_params(ivf, nprobe=1)  # ~40 items per list: 250 seen cannot fit
  result = search_lib.search_unseen(ivf, Vocabulary(raw_ids), queries, values, offsets,
                                    topk=30)
  assert result.researched_rows >= 1
  assert (result.counts == 30).all()
  assert faiss.extract_index_ivf(ivf).nprobe == 1  # nprobe restored


def test_ivf_list_count_is_capped_at_39_items_per_list():
  spec = index_lib.IndexSpec("ivf", nlist=100).resolved(num_vectors=390, dim=8)
  assert spec.nlist == 10
  assert index_lib.auto_nlist(364_047) == int(4 * np.sqrt(364_047))
  # nprobe: ~max(N / 16, 100 topk) items scanned. ML-1M (3,706 items, 95
  # lists): 10,000 wanted > N, every list. 364,047 items in 2,413 lists of
  # ~150.9: N / 16 = 22,753 items = 150.8 lists -> 151.
  assert index_lib.auto_nprobe(95, 3706, 100) == 95
  assert index_lib.auto_nprobe(2413, 364_047, 100) == 151
  with pytest.raises(ValueError, match="--nlist=500 is larger than the item count"):
    index_lib.IndexSpec("ivf", nlist=500).resolved(num_vectors=390, dim=8)
  with pytest.raises(ValueError, match="--pq_m=3 must divide"):
    index_lib.IndexSpec("ivf_pq", pq_m=3).resolved(num_vectors=5000, dim=8)


def test_saved_index_loads_with_faiss_and_returns_raw_ids(tmp_path):
  vectors, queries, _, _, _, raw_ids = random_case(num_items=500, dim=8)
  index, _ = index_lib.build(vectors, raw_ids, index_lib.IndexSpec("ivf", nlist=10))
  index_lib.save(index, tmp_path, {"kind": "ivf"})
  loaded = faiss.read_index(str(tmp_path / index_lib.INDEX_FILE))
  assert faiss.extract_index_ivf(loaded).nprobe == 1  # FAISS default: set after load
  assert index_lib.set_search_params(loaded, nprobe=10) == {"nprobe": 10, "nlist": 10}
  _, labels = loaded.search(queries[:2], 5)
  assert np.isin(labels, raw_ids).all()


def test_rank_sums_merge_to_the_same_metrics_as_summarize():
  # ranks 0, 3, 12, absent(=K): HR@10 = 2/4; NDCG@10 = (1/log2(2) + 1/log2(5)) / 4
  ranks = np.array([0, 3, 12, 100])
  parts = [metrics.rank_sums(ranks[:1], (10,)), metrics.rank_sums(ranks[1:], (10,))]
  merged = metrics.summarize_sums(metrics.merge_sums(parts), (10,))
  assert merged["hit_rate@10"] == 0.5
  assert merged["ndcg@10"] == pytest.approx((1.0 + 1 / np.log2(5)) / 4)
  assert merged == pytest.approx(metrics.summarize(ranks, (10,)))


def test_overlap_counts_shared_items_over_the_reference():
  found = np.array([[1, 2, 3, 4], [5, 6, 0, 0]])
  reference = np.array([[4, 3, 9, 8], [5, 7, 8, 9]])
  # row 0 shares {3, 4} of 4; row 1 shares {5} of 4 (padding 0 never counts)
  np.testing.assert_allclose(job._overlap(found, reference, np.array([4, 4])), [0.5, 0.25])


# ---- the job on a trained export -------------------------------------------------


def job_config(data, model_dir, out, **overrides):
  base = job.RetrievalConfig(data_dir=str(data.data_dir), model_dir=str(model_dir),
                             output_dir=str(out), topk=20, batch_size=64, eval_split="test",
                             eval_topk=(5, 10))
  return dataclasses.replace(base, **overrides)


def read_candidates(out):
  return pd.read_parquet(out / job.CANDIDATES_DIR).sort_values(
      ["user_id", "recall_rank"]).reset_index(drop=True)


def test_flat_job_metrics_equal_the_trainers_full_ranking(tiny_data, tiny_export, tmp_path):
  result = job.run(job_config(tiny_data, tiny_export, tmp_path / "out"))
  trained = json.loads((tiny_export / "metrics.json").read_text())
  assert result["num_users"] == trained["num_users"]
  for key in ("hit_rate@5", "ndcg@5", "hit_rate@10", "ndcg@10"):
    assert result[key] == pytest.approx(trained[key], abs=1e-9), key
  cands = read_candidates(tmp_path / "out")
  users = pq.read_table(tiny_data.path("vocab/users.parquet")).num_rows - 1
  assert cands.user_id.nunique() == users == result["users"]
  assert (cands.groupby("user_id").size() == 20).all()
  ranks = cands.groupby("user_id").recall_rank.apply(list)
  assert (ranks.apply(lambda r: r == list(range(1, 21)))).all()
  assert cands.recall_score.dtype == np.float32
  assert not cands.duplicated(["user_id", "item_id"]).any()
  assert (tmp_path / "out" / job.SUCCESS_FILE).exists()


@pytest.mark.slow
def test_two_workers_together_equal_one(tiny_data, tiny_export, tmp_path):
  job.run(job_config(tiny_data, tiny_export, tmp_path / "one"))
  first = job.run(job_config(tiny_data, tiny_export, tmp_path / "two", num_workers=2))
  assert first == {}  # worker 0 alone: no metrics yet
  second = job.run(job_config(tiny_data, tiny_export, tmp_path / "two", num_workers=2,
                              worker_index=1))
  pd.testing.assert_frame_equal(read_candidates(tmp_path / "one"),
                                read_candidates(tmp_path / "two"))
  one = json.loads((tmp_path / "one" / job.METRICS_FILE).read_text())
  for key in ("hit_rate@10", "ndcg@10", "users", "candidates"):
    assert second[key] == pytest.approx(one[key])


def test_rerun_after_a_crash_finishes_the_missing_parts_only(tiny_data, tiny_export, tmp_path):
  out = tmp_path / "out"
  config = job_config(tiny_data, tiny_export, out)
  complete = job.run(config)
  expected = read_candidates(out)
  parts = sorted((out / job.CANDIDATES_DIR).glob("part-*.parquet"))
  assert len(parts) >= 3
  # A crash after the first part: later parts never renamed into place, a
  # half-written temporary left behind, no markers.
  kept_mtime = parts[0].stat().st_mtime_ns
  for part in parts[1:]:
    part.unlink()
  (out / job.CANDIDATES_DIR / f".{parts[1].name}.tmp-crash").write_bytes(b"PAR1 half")
  for marker in out.glob("_SUCCESS*"):
    marker.unlink()
  (out / job.METRICS_FILE).unlink()
  resumed = job.run(config)
  assert parts[0].stat().st_mtime_ns == kept_mtime  # not redone
  pd.testing.assert_frame_equal(read_candidates(out), expected)
  assert not list((out / job.CANDIDATES_DIR).glob(".*tmp*"))
  for key in ("hit_rate@10", "ndcg@10", "users", "candidates"):
    assert resumed[key] == pytest.approx(complete[key])


@pytest.mark.slow
def test_ivf_job_reports_ann_recall(tiny_data, tiny_export, tmp_path):
  result = job.run(job_config(tiny_data, tiny_export, tmp_path / "ivf", index="ivf",
                              ann_recall_users=50))
  assert result["index"] == "ivf" and result["nprobe"] >= 1
  assert 0.0 < result["ann_recall@20"] <= 1.0 and result["ann_recall_users"] >= 50
  full = job.run(job_config(tiny_data, tiny_export, tmp_path / "ivf_all", index="ivf",
                            nprobe=result["nlist"], ann_recall_users=50))
  assert full["ann_recall@20"] == pytest.approx(1.0)


@pytest.mark.slow
def test_another_jobs_output_is_refused_without_overwrite(tiny_data, tiny_export, tmp_path):
  job.run(job_config(tiny_data, tiny_export, tmp_path / "out"))
  with pytest.raises(job.ConfigError, match="differs in topk"):
    job.run(job_config(tiny_data, tiny_export, tmp_path / "out", topk=10))
  result = job.run(job_config(tiny_data, tiny_export, tmp_path / "out", topk=10, overwrite=True))
  assert result["candidates"] == result["users"] * 10
  # A retrained model (same directory and step, other weights) must not
  # reuse the old parts.
  model = tmp_path / "model"
  shutil.copytree(tiny_export, model)
  job.run(job_config(tiny_data, model, tmp_path / "out2"))
  embeddings = model / "export" / "item_embeddings.npy"
  np.save(embeddings, np.load(embeddings)[:, ::-1].copy())
  with pytest.raises(job.ConfigError, match=r"differs in item_embeddings_sha256\)"):
    job.run(job_config(tiny_data, model, tmp_path / "out2"))


def retrieval_cli(*args):
  return subprocess.run([sys.executable, "-m", "retrieval.main", *args], capture_output=True,
                        text=True, timeout=300)


@pytest.mark.parametrize("extra, message", [
    (["--topk=100000"], "--topk=100000 is larger than the item count"),
    (["--index=ivf", "--nlist=100000"], "--nlist=100000 is larger than the item count"),
    (["--num_workers=2", "--worker_index=2"], "--worker_index=2 is out of range"),
    (["--eval_topk=10,50", "--topk=20"], "--eval_topk=10,50: each K must be in 1..--topk"),
    # FAISS would divide by zero, abort (hnsw_m 0) or crash (hnsw_m 1).
    (["--index=ivf_pq", "--pq_m=0"], "--pq_m=0: must be >= 1"),
    (["--index=ivf_pq", "--pq_m=-16"], "--pq_m=-16: must be >= 1"),
    (["--index=ivf_pq", "--pq_m=3"], "--pq_m=3 must divide the embedding size 16"),
    (["--index=hnsw", "--hnsw_m=0"], "--hnsw_m=0: must be in 2..512"),
    (["--index=hnsw", "--hnsw_m=1"], "--hnsw_m=1: must be in 2..512"),
    (["--index=hnsw", "--ef_search=-1"], "--ef_search=-1: must be >= 0"),
    (["--index=ivf", "--nprobe=-2"], "--nprobe=-2: must be >= 0"),
    # Another index kind's setting would be ignored silently.
    (["--nlist=8"], "--nlist=8 applies to --index=ivf or ivf_pq, not --index=flat"),
    (["--index=hnsw", "--nprobe=4"], "--nprobe=4 applies to --index=ivf or ivf_pq, not --index=hnsw"),
    (["--index=ivf", "--ef_search=64"], "--ef_search=64 applies to --index=hnsw, not --index=ivf"),
])
def test_bad_flags_fail_before_work_with_one_line(tiny_data, tiny_export, tmp_path, extra, message):
  out = tmp_path / "out"
  result = retrieval_cli(f"--data_dir={tiny_data.data_dir}", f"--model_dir={tiny_export}",
                         f"--output_dir={out}", *extra)
  assert result.returncode == 2, result.stderr
  assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
  assert not out.exists()


@pytest.mark.slow
def test_model_without_export_or_from_other_data_is_refused(tiny_data, tiny_news_dir,
                                                            tiny_export, tmp_path):
  from preprocess import pipeline
  from tests.conftest import make_config
  # The same log with the other holdout: other training clicks, other vocabulary.
  other = pipeline.run(make_config(tiny_news_dir, tmp_path / "other", holdout="last",
                                   max_seq_len=8))
  result = retrieval_cli(f"--data_dir={tiny_data.data_dir}", f"--model_dir={tmp_path}",
                         f"--output_dir={tmp_path / 'a'}")
  assert result.returncode == 1 and "no export/export_manifest.json" in result.stderr
  result = retrieval_cli(f"--data_dir={other.data_dir}", f"--model_dir={tiny_export}",
                         f"--output_dir={tmp_path / 'b'}")
  assert result.returncode == 1 and "another item vocabulary" in result.stderr
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---- concurrent jobs on one output directory ---------------------------------------


def _start_cli(tiny_data, tiny_export, out, *extra):
  return subprocess.Popen(
      [sys.executable, "-m", "retrieval.main", f"--data_dir={tiny_data.data_dir}",
       f"--model_dir={tiny_export}", f"--output_dir={out}", "--batch_size=10",
       "--eval_split=test", "--eval_topk=5,10", *extra],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_jobs_with_other_flags_started_together_one_wins(tiny_data, tiny_export, tmp_path):
  out = tmp_path / "out"
  procs = [_start_cli(tiny_data, tiny_export, out, f"--topk={k}") for k in (20, 30)]
  results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
  codes = sorted(rc for rc, _, _ in results)
  # The loser is refused while the winner runs (1, naming it) or after it (2).
  assert codes in ([0, 1], [0, 2]), results
  _, _, stderr = next(r for r in results if r[0] != 0)
  assert "holds output of a different retrieval job (differs in topk" in stderr
  # One error line; before it at most the log line saying whose claim it waited for.
  *logged, error = stderr.strip().splitlines()
  assert error.startswith("retrieval: error: ") and "Traceback" not in stderr, stderr
  assert all(line.startswith("I") and "waiting for" in line for line in logged), stderr
  # The output is the winner's alone: every user has the job's topk rows.
  topk = json.loads((out / job.JOB_FILE).read_text())["topk"]
  per_user = read_candidates(out).groupby("user_id").size()
  assert set(per_user) == {topk}
  assert json.loads((out / job.METRICS_FILE).read_text())["topk"] == topk


@pytest.mark.slow
def test_workers_of_one_job_started_together_share_it(tiny_data, tiny_export, tmp_path):
  job.run(job_config(tiny_data, tiny_export, tmp_path / "one", batch_size=10))
  procs = [_start_cli(tiny_data, tiny_export, tmp_path / "two", "--topk=20", "--num_workers=2",
                      f"--worker_index={w}") for w in (0, 1)]
  results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
  assert [rc for rc, _, _ in results] == [0, 0], results
  pd.testing.assert_frame_equal(read_candidates(tmp_path / "one"),
                                read_candidates(tmp_path / "two"))
  assert (tmp_path / "two" / job.SUCCESS_FILE).exists()


def test_a_share_that_is_running_is_not_run_twice(tiny_data, tiny_export, tmp_path):
  out = tmp_path / "out"
  share = out / f"{output_lib.SHARE_LOCK_PREFIX}{output_lib.part_prefix(0, 1)}"
  with locks.exclusive_file(share, "test", out):
    with pytest.raises(locks.DirectoryLocked, match="in use by another retrieval worker 0 of 1"):
      job.run(job_config(tiny_data, tiny_export, out))
    assert not (out / job.CANDIDATES_DIR).exists()
  job.run(job_config(tiny_data, tiny_export, out))  # released: the same job runs


@pytest.mark.slow
def test_overwrite_is_refused_at_once_naming_the_running_job(tiny_data, tiny_export, tmp_path):
  out = tmp_path / "out"
  job.run(job_config(tiny_data, tiny_export, out))
  before = read_candidates(out)
  running = job.open_job(job_config(tiny_data, tiny_export, out))  # a worker, still running
  try:
    for overwrite in (True, False):
      started = time.monotonic()
      with pytest.raises(locks.DirectoryLocked,
                         match=rf"{out}: holds output of a different retrieval job \(differs in "
                               rf"topk\), which is running there \(pid {os.getpid()} on "):
        job.run(job_config(tiny_data, tiny_export, out, topk=10, overwrite=overwrite))
      assert time.monotonic() - started < 10  # refused, not waited for
  finally:
    running.lock.close()
  pd.testing.assert_frame_equal(read_candidates(out), before)
  result = job.run(job_config(tiny_data, tiny_export, out, topk=10, overwrite=True))
  assert result["candidates"] == result["users"] * 10


def test_a_claim_in_progress_is_waited_for_with_its_holder_named(tiny_data, tiny_export,
                                                                 tmp_path, caplog):
  out = tmp_path / "out"
  claiming = locks.LockFile(out / output_lib.CLAIM_LOCK, "test", out)
  claiming.take()  # another job claiming (or replacing) the output, for one second
  release = threading.Timer(1.0, claiming.close)
  release.start()
  try:
    with caplog.at_level(logging.INFO, logger="absl"):
      assert job.run(job_config(tiny_data, tiny_export, out))["users"] > 0
  finally:
    release.join()
  assert f"{out}: waiting for pid {os.getpid()} on " in caplog.text


def tree(root):
  """Every file and folder under `root`: relative path -> bytes (None for a folder)."""
  return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes())
          for p in sorted(root.rglob("*"))}


@pytest.mark.slow
def test_a_trainer_model_dir_as_output_is_refused_and_left_as_it_was(tiny_data, tiny_export,
                                                                    tmp_path):
  other_model = tmp_path / "other_model"
  shutil.copytree(tiny_export, other_model)
  for out in (tiny_export, other_model):
    before = tree(out)
    assert "metrics.json" in before and "export/export_manifest.json" in before
    for overwrite in (False, True):
      with pytest.raises(DataError) as refused:
        job.run(job_config(tiny_data, tiny_export, out, overwrite=overwrite))
      assert tree(out) == before  # not a byte written, not a file added (no lock either)
    if out == tiny_export:
      assert f"holds the input {tiny_export}" in str(refused.value)
    else:
      assert "not a retrieval output: holds checkpoints" in str(refused.value)
  # Through the binary: one line, exit 1.
  result = retrieval_cli(f"--data_dir={tiny_data.data_dir}", f"--model_dir={tiny_export}",
                         f"--output_dir={other_model}", "--overwrite", "--topk=20")
  assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
  assert "which retrieval never writes" in result.stderr
  assert tree(other_model) == before


def test_a_folder_of_the_users_or_above_the_inputs_is_refused(tiny_data, tiny_export, tmp_path):
  folder = tmp_path / "mine"
  folder.mkdir()
  (folder / "notes.txt").write_text("keep me")
  for overwrite in (False, True):
    with pytest.raises(DataError, match=r"mine: not a retrieval output: holds notes.txt, which "
                                        "retrieval never writes"):
      job.run(job_config(tiny_data, tiny_export, folder, overwrite=overwrite))
  assert tree(folder) == {"notes.txt": b"keep me"}
  # The data directory, or a folder holding it or the model: replacing would delete them.
  for out in (tiny_data.data_dir, tiny_data.data_dir.parent, tiny_export.parent):
    before = tree(out)
    with pytest.raises(DataError, match="holds the input"):
      job.run(job_config(tiny_data, tiny_export, out, overwrite=True))
    assert tree(out) == before


@pytest.mark.slow
def test_overwrite_deletes_only_what_retrieval_wrote(tiny_data, tiny_export, tmp_path):
  out = tmp_path / "out"
  job.run(job_config(tiny_data, tiny_export, out))
  parts = sorted(p.name for p in (out / job.CANDIDATES_DIR).iterdir())
  # A file of the user's among the parts: --overwrite would delete it; refused
  # (and a re-run of the same job too: the directory is no longer only a retrieval output).
  (out / job.CANDIDATES_DIR / "notes.txt").write_text("keep me")
  for overwrite in (True, False):
    with pytest.raises(DataError, match=r"holds candidates/notes.txt, which retrieval never "):
      job.run(job_config(tiny_data, tiny_export, out, topk=10, overwrite=overwrite))
  assert sorted(p.name for p in (out / job.CANDIDATES_DIR).iterdir()) == sorted(parts + ["notes.txt"])
  (out / job.CANDIDATES_DIR / "notes.txt").unlink()
  result = job.run(job_config(tiny_data, tiny_export, out, topk=10, overwrite=True))
  assert result["candidates"] == result["users"] * 10
  assert json.loads((out / job.JOB_FILE).read_text())["topk"] == 10
  assert set(read_candidates(out).groupby("user_id").size()) == {10}


def test_a_job_that_failed_building_its_index_does_not_hold_the_output(
    tiny_data, tiny_export, tmp_path, monkeypatch):
  out = tmp_path / "out"

  def build_fails(*args, **kwargs):
    raise RuntimeError("killed while training the quantiser")

  with monkeypatch.context() as m:
    m.setattr(index_lib, "build", build_fails)
    with pytest.raises(RuntimeError, match="killed while"):
      job.run(job_config(tiny_data, tiny_export, out, index="ivf"))
  assert json.loads((out / job.JOB_FILE).read_text())["index"] == "ivf"  # claimed, no result
  # The corrected command takes the output over without --overwrite...
  result = job.run(job_config(tiny_data, tiny_export, out, index="hnsw"))
  assert result["index"] == "hnsw"
  # ...but once a job has results, another is refused without --overwrite.
  with pytest.raises(ConfigError, match="differs in index, spec"):
    job.run(job_config(tiny_data, tiny_export, out))


def test_eval_topk_defaults_to_the_cut_offs_within_topk():
  def config(**kwargs):
    return job.RetrievalConfig(data_dir="d", model_dir="m", output_dir="o", **kwargs)
  assert config().eval_topk == (10, 20, 50)  # topk 100
  assert config(topk=30).eval_topk == (10, 20)
  assert config(topk=10).eval_topk == (10,)
  assert config(topk=5).eval_topk == (5,)  # none of 10, 20, 50 fits: topk itself
  config(topk=10).validate()
  with pytest.raises(ConfigError, match="--eval_topk=50: each K must be in 1..--topk"):
    config(topk=10, eval_topk=(50,)).validate()


@pytest.mark.slow
def test_topk_alone_below_the_default_cut_offs_runs(tiny_data, tiny_export, tmp_path):
  result = retrieval_cli(f"--data_dir={tiny_data.data_dir}", f"--model_dir={tiny_export}",
                         f"--output_dir={tmp_path / 'out'}", "--topk=10", "--eval_split=test")
  assert result.returncode == 0, result.stderr
  assert "HR@10" in result.stdout
  metrics_written = json.loads((tmp_path / "out" / job.METRICS_FILE).read_text())
  assert "hit_rate@10" in metrics_written and "hit_rate@20" not in metrics_written


def test_the_ray_engine_checks_the_output_before_ray_starts(tiny_data, tiny_export, tmp_path,
                                                            monkeypatch):
  from retrieval import ray_engine

  class RayMustNotStart:
    def __getattr__(self, name):
      raise AssertionError(f"ray.{name} used before the flags and output were checked")

  monkeypatch.setattr(ray_engine, "import_ray", RayMustNotStart)
  folder = tmp_path / "mine"
  folder.mkdir()
  (folder / "notes.txt").write_text("keep me")
  with pytest.raises(DataError, match="not a retrieval output"):
    ray_engine.run(job_config(tiny_data, tiny_export, folder, overwrite=True))
  with pytest.raises(ConfigError, match="--hnsw_m=0"):
    ray_engine.run(job_config(tiny_data, tiny_export, tmp_path / "out", index="hnsw", hnsw_m=0))
  assert tree(folder) == {"notes.txt": b"keep me"} and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_damaged_job_file_and_a_file_as_output_are_one_line_errors(tiny_data, tiny_export,
                                                                   tmp_path):
  out = tmp_path / "out"
  job.run(job_config(tiny_data, tiny_export, out))
  (out / job.JOB_FILE).write_text('{"topk": 2')  # cut short
  with pytest.raises(DataError, match=r"job.json: unreadable .*pass --overwrite"):
    job.run(job_config(tiny_data, tiny_export, out))
  assert job.run(job_config(tiny_data, tiny_export, out, overwrite=True))["users"] > 0
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  result = retrieval_cli(f"--data_dir={tiny_data.data_dir}", f"--model_dir={tiny_export}",
                         f"--output_dir={a_file}", "--topk=20", "--eval_topk=5,10")
  assert result.returncode == 1, result.stderr
  assert "exists and is not a directory" in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1 and a_file.read_text() == "x"


@pytest.mark.slow
def test_users_rekeyed_under_the_same_items_are_refused_for_a_user_embedding(
    tiny_data, tiny_export, tmp_path):
  import pyarrow as pa
  from tests.conftest import small_trainer_config
  from trainer import train_lib
  from contracts.export_manifest import load_info
  two_tower = tmp_path / "two_tower"
  train_lib.train(small_trainer_config(tiny_data.data_dir, two_tower, model="two_tower",
                                       train_steps=2, eval_split="test"), tiny_data)
  assert set(load_info(two_tower).vocab_fingerprints) == {"items", "users"}
  assert set(load_info(tiny_export).vocab_fingerprints) == {"items"}  # sasrec: no user input
  # The same data with its users re-keyed: the same items.parquet, other user indices.
  rekeyed = tmp_path / "rekeyed"
  shutil.copytree(tiny_data.data_dir, rekeyed)
  users = pq.read_table(rekeyed / "vocab" / "users.parquet")
  raw = users.column("user_id").to_numpy()
  users = users.set_column(users.schema.get_field_index("user_id"), "user_id",
                           pa.array(np.concatenate([raw[:1], raw[1:][::-1]])))
  pq.write_table(users, rekeyed / "vocab" / "users.parquet")
  with pytest.raises(DataError, match=r"trained on another user vocabulary .*; "
                                      r"vocab/users.parquet differs$"):
    job.run(job_config(tiny_data, two_tower, tmp_path / "out", data_dir=str(rekeyed)))
  assert not (tmp_path / "out").exists()
  # sasrec reads histories only: the re-keyed users are no concern of it.
  from contracts import manifest as mf
  from retrieval import user_tower
  user_tower.check_export_matches_data(tiny_export, mf.load(rekeyed))
