"""preprocess --mode=ranking on a hand-written log with hand-computed features."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

from contracts import candidates as cands_contract
from contracts import manifest as mf
from contracts.errors import ConfigError, DataError
from contracts.vocab import Vocabulary
from preprocess import pipeline, ranking
from tests.conftest import make_config
from contracts.export_manifest import data_fingerprint
from trainer.input_pipeline import parse_batch

T0 = 1_500_000_000_000  # ms
HOUR = 3_600_000

# article: (category, created_at hours after T0, words)
ARTICLES = {10: (1, 0.0, 100), 11: (1, 0.5, 150), 12: (2, 1.5, 300), 13: (2, 4.0, 50),
            14: (1, 1.0, 200)}
# user -> clicks (article, hours); valid_test holds out the last two.
CLICKS = {1: [(10, 1), (11, 2), (12, 3), (13, 5)],
          2: [(11, 1), (10, 2), (11, 3), (14, 6), (12, 8)]}
# Unit item embeddings (by raw id) for emb_sim_last.
EMBEDDINGS = {10: (1.0, 0.0), 11: (0.6, 0.8), 12: (0.0, 1.0), 13: (-1.0, 0.0), 14: (0.8, 0.6)}


def write_log(directory: Path, clicks=CLICKS) -> Path:
  directory.mkdir(parents=True)
  rows = [(u, a, T0 + int(h * HOUR)) for u, seq in clicks.items() for a, h in seq]
  lines = ["user_id,click_article_id,click_timestamp"] + [f"{u},{a},{t}" for u, a, t in rows]
  (directory / "train_click_log.csv").write_text("\n".join(lines) + "\n")
  lines = ["article_id,category_id,created_at_ts,words_count"] + [
      f"{a},{c},{T0 + int(h * HOUR)},{w}" for a, (c, h, w) in ARTICLES.items()]
  (directory / "articles.csv").write_text("\n".join(lines) + "\n")
  return directory


def fake_retrieval(directory: Path, data: mf.Manifest, split: str, rows,
                   version: int = cands_contract.CANDIDATES_VERSION,
                   item_column: str = cands_contract.ITEM_COLUMN) -> Path:
  """A finished retrieval job output with the given (user, article, score, rank)
  rows; `version` 1 is an older retrieval's (no version key in job.json)."""
  (directory / "candidates").mkdir(parents=True)
  user, article, score, rank = zip(*rows)
  pq.write_table(pa.table({"user_id": pa.array(user, pa.int64()),
                           item_column: pa.array(article, pa.int64()),
                           "recall_score": pa.array(score, pa.float32()),
                           "recall_rank": pa.array(rank, pa.int32())}),
                 directory / "candidates" / "part-00000-of-00001-000000.parquet")
  versioned = {cands_contract.VERSION_KEY: version} if version != 1 else {}
  (directory / "job.json").write_text(json.dumps({
      **versioned, "eval_split": split, "data_fingerprint": data_fingerprint(data),
      "model_dir": "", "item_embeddings_sha256": "same-model"}))
  (directory / "_SUCCESS").write_text("{}")
  return directory


def embeddings_file(path: Path, data: mf.Manifest) -> Path:
  items = Vocabulary.from_parquet(data.path(mf.ITEMS_FILE), "item_id")
  vectors = np.zeros((items.size, 2), np.float32)
  for raw, vector in EMBEDDINGS.items():
    vectors[items.lookup([raw])[0]] = vector
  np.save(path, vectors)
  return path


VALID_ROWS = [(1, 12, 0.9, 1), (1, 14, 0.7, 2), (2, 10, 0.8, 1), (2, 14, 0.6, 2),
              (2, 13, 0.5, 3)]
TEST_ROWS = [(1, 13, 0.9, 1), (1, 10, 0.8, 2), (2, 13, 0.7, 1), (2, 12, 0.6, 2)]


def build(tmp: Path, clicks=CLICKS, **overrides) -> mf.RankingManifest:
  data = pipeline.run(make_config(write_log(tmp / "raw", clicks), tmp / "data",
                                  holdout="valid_test", max_seq_len=4))
  valid = fake_retrieval(tmp / "cands_valid", data, mf.VALID, VALID_ROWS)
  test = fake_retrieval(tmp / "cands_test", data, mf.TEST, TEST_ROWS)
  config = ranking.RankingConfig(
      data_dir=str(tmp / "data"), candidates=(str(valid), str(test)), output_dir=str(tmp / "rank"),
      item_embeddings=str(embeddings_file(tmp / "emb.npy", data)), max_hist_len=3,
      negatives_per_user=0, num_shards=1, compression="NONE")
  for name, value in overrides.items():
    config = config.__class__(**{**config.__dict__, name: value})
  return ranking.run(config)


def read_split(manifest: mf.RankingManifest, split: str) -> dict[str, np.ndarray]:
  files = [str(p) for p in manifest.shard_paths(split)]
  batch = next(iter(tf.data.TFRecordDataset(
      files, compression_type=manifest.tfrecord_compression).batch(1000)))
  parsed = parse_batch(batch, manifest.feature_specs)
  items = Vocabulary.from_parquet(manifest.path(mf.ITEMS_FILE), "item_id")
  out = {name: value.numpy() for name, value in parsed.items()}
  out["raw_candidate"] = items.to_raw(out[mf.FEATURE_CANDIDATE])
  out["raw_history"] = np.where(out[mf.FEATURE_HISTORY] > 0, items.to_raw(
      np.maximum(out[mf.FEATURE_HISTORY], 1)), 0)
  return out


def row_of(split: dict, user: int, article: int) -> int:
  return int(np.flatnonzero((split[mf.FEATURE_USER] == user) &
                            (split["raw_candidate"] == article))[0])


def features(split: dict, user: int, article: int) -> dict[str, float]:
  dense = split[mf.FEATURE_DENSE][row_of(split, user, article)]
  return dict(zip(mf.DENSE_FEATURES, dense.tolist()))


def test_features_by_hand(tmp_path):
  m = build(tmp_path)
  train, evaluation = read_split(m, mf.RANK_TRAIN), read_split(m, mf.RANK_EVAL)
  assert m.eval_split == mf.TEST and m.counts["examples_train"] == 5
  # User 1, valid split: query = train clicks [10 @1h, 11 @2h]; last = 11 (cat 1,
  # created 0.5h), query time 2h. Candidate 12 (cat 2, created 1.5h, 300 words,
  # 0 training clicks): age = 2 - 1.5 = 0.5 h; gap = 0.5 - 1.5 = -1 h;
  # cos(e12, e11) = 0*0.6 + 1*0.8 = 0.8; different category; label 1 (valid = 12).
  f = features(train, 1, 12)
  assert f == pytest.approx(dict(
      recall_score=0.9, recall_rank=1, user_click_count=2, user_unique_items=2,
      item_click_count=0, words_count=300, item_age_hours=0.5, time_gap_hours=-1.0,
      emb_sim_last=0.8, is_same_category=0, transitions_from_last=0), abs=1e-6)
  assert train[mf.FEATURE_LABEL][row_of(train, 1, 12)] == 1
  # Candidate 14 (cat 1, created 1h, 200 words): age = 2 - 1 = 1; gap = 0.5 - 1
  # = -0.5; cos(e14, e11) = 0.8*0.6 + 0.6*0.8 = 0.96; same category.
  f = features(train, 1, 14)
  assert (f["item_age_hours"], f["time_gap_hours"], f["is_same_category"]) == \
      pytest.approx((1.0, -0.5, 1.0))
  assert f["emb_sim_last"] == pytest.approx(0.96)
  assert train[mf.FEATURE_LABEL][row_of(train, 1, 14)] == 0
  # User 2, valid split: query [11 @1h, 10 @2h, 11 @3h] -> 3 clicks, 2 distinct;
  # candidate 10 has 2 training clicks (users 1 and 2), created 0h: age = 3 h,
  # gap = created(11) - created(10) = 0.5 h; cos(e10, e11) = 0.6. Training
  # transitions: user 1 10->11, user 2 11->10, 10->11: last 11 -> 10 once.
  f = features(train, 2, 10)
  assert f == pytest.approx(dict(
      recall_score=0.8, recall_rank=1, user_click_count=3, user_unique_items=2,
      item_click_count=2, words_count=100, item_age_hours=3.0, time_gap_hours=0.5,
      emb_sim_last=0.6, is_same_category=1, transitions_from_last=1), abs=1e-6)
  # History: the last max_hist_len=3 query clicks, left-padded.
  assert train["raw_history"][row_of(train, 1, 12)].tolist() == [0, 10, 11]
  assert train["raw_history"][row_of(train, 2, 10)].tolist() == [11, 10, 11]

  # Test split (eval): user 1's query adds the validation click 12 @3h, so the
  # last click is 12 (cat 2, created 1.5h) and the query time 3h. Candidate 13
  # (cat 2, created 4h): age = 3 - 4 = -1; gap = 1.5 - 4 = -2.5; cos(e13, e12) = 0.
  f = features(evaluation, 1, 13)
  assert f == pytest.approx(dict(
      recall_score=0.9, recall_rank=1, user_click_count=3, user_unique_items=3,
      item_click_count=0, words_count=50, item_age_hours=-1.0, time_gap_hours=-2.5,
      emb_sim_last=0.0, is_same_category=1, transitions_from_last=0), abs=1e-6)
  assert evaluation[mf.FEATURE_LABEL][row_of(evaluation, 1, 13)] == 1
  assert evaluation["raw_history"][row_of(evaluation, 1, 13)].tolist() == [10, 11, 12]
  # Eval rows are ordered by user, then retrieval rank; every candidate is kept.
  assert evaluation[mf.FEATURE_USER].tolist() == [1, 1, 2, 2]
  assert evaluation[mf.FEATURE_DENSE][:, 1].tolist() == [1, 2, 1, 2]
  # Training statistics are of the training split (5 rows), of what the model
  # standardises: recall_rank 1,2,1,2,3 is log-scaled -> log 2, log 3, log 2, log 3,
  # log 4; recall_score 0.9, 0.7, 0.8, 0.6, 0.5 is not.
  logs = np.log([2, 3, 2, 3, 4])
  assert m.dense_log1p[:2] == (False, True)
  assert m.dense_mean[1] == pytest.approx(logs.mean())
  assert m.dense_var[1] == pytest.approx(((logs - logs.mean()) ** 2).mean())
  assert m.dense_mean[0] == pytest.approx(0.7) and m.dense_var[0] == pytest.approx(0.02)


def test_transitions_count_consecutive_training_clicks_only(tmp_path):
  data = pipeline.run(make_config(write_log(tmp_path / "raw"), tmp_path / "data",
                                  holdout="valid_test", max_seq_len=4))
  table = pq.read_table(data.path(mf.USER_HISTORIES_FILE))
  items = ranking.ItemFeatures.read(data, table)
  vocab = Vocabulary.from_parquet(data.path(mf.ITEMS_FILE), "item_id")
  pairs = np.array([[10, 11], [11, 10], [11, 12], [12, 13], [10, 10]])
  counts = items.transitions(vocab.lookup(pairs[:, 0]), vocab.lookup(pairs[:, 1]))
  # 10->11 by both users; 11->10 by user 2; 11->12 and 12->13 cross into the
  # held-out clicks (valid 12, test 13), so they are not training transitions.
  assert counts.tolist() == [2, 1, 0, 0, 0]


def test_features_never_read_the_held_out_click(tmp_path):
  original = build(tmp_path / "a")
  # Another test click for both users (other item, other time): every feature
  # of every example must stay the same; only labels may change.
  changed = {1: CLICKS[1][:3] + [(14, 7)], 2: CLICKS[2][:4] + [(13, 9.5)]}
  moved = build(tmp_path / "b", clicks=changed)
  for split in (mf.RANK_TRAIN, mf.RANK_EVAL):
    a, b = read_split(original, split), read_split(moved, split)
    for name in (mf.FEATURE_USER, mf.FEATURE_HISTORY, mf.FEATURE_CANDIDATE, mf.FEATURE_DENSE,
                 mf.FEATURE_CANDIDATE_CATEGORY):
      np.testing.assert_array_equal(a[name], b[name], err_msg=f"{split} {name}")
  a, b = read_split(original, mf.RANK_EVAL), read_split(moved, mf.RANK_EVAL)
  assert not np.array_equal(a[mf.FEATURE_LABEL], b[mf.FEATURE_LABEL])


def test_negatives_are_capped_per_user_in_training_only(tmp_path):
  m = build(tmp_path, negatives_per_user=1)
  train = read_split(m, mf.RANK_TRAIN)
  # User 1: positive 12 + 1 of 1 negative; user 2: positive 14 + 1 of 2 negatives.
  assert sorted(train[mf.FEATURE_USER].tolist()) == [1, 1, 2, 2]
  assert train[mf.FEATURE_LABEL].sum() == 2
  assert m.counts["examples_eval"] == len(TEST_ROWS)


def test_top_negative_sampling_keeps_the_best_ranked_negatives(tmp_path):
  m = build(tmp_path, negatives_per_user=1, negative_sampling="top")
  train = read_split(m, mf.RANK_TRAIN)
  kept = sorted(zip(train[mf.FEATURE_USER].tolist(), train["raw_candidate"].tolist()))
  # User 1: positive 12, negative 14 (rank 2). User 2: positive 14 (rank 2);
  # negatives 10 (rank 1) and 13 (rank 3) -> the rank-1 one, 10.
  assert kept == [(1, 12), (1, 14), (2, 10), (2, 14)]


def test_cap_negatives_mixed_takes_half_hard_half_random():
  rng = np.random.default_rng(0)
  user = np.repeat([1, 2], 10)
  label = np.zeros(20, np.int64)
  label[[3, 15]] = 1
  rank = np.tile(np.arange(1, 11), 2)
  keep = ranking.cap_negatives(user, label, rank, 4, "mixed", rng)
  for u, positive in ((1, 3), (2, 15)):
    rows = np.flatnonzero(user == u)
    kept = rows[keep[rows]]
    assert positive in kept and len(kept) == 5  # the positive + 4 negatives
    negatives = sorted(rank[kept[label[kept] == 0]].tolist())
    best = [r for r in rank[rows].tolist() if label[rows][r - 1] == 0][:2]
    assert negatives[:2] == best  # the 2 best-ranked negatives, then 2 random others


def test_holdout_last_splits_users(tmp_path):
  data = pipeline.run(make_config(write_log(tmp_path / "raw"), tmp_path / "data",
                                  holdout="last", max_seq_len=4))
  # holdout=last: the last clicks (13 for user 1, 12 for user 2) are the labels.
  valid = fake_retrieval(tmp_path / "cands", data, mf.VALID, TEST_ROWS)
  m = ranking.run(ranking.RankingConfig(
      data_dir=str(tmp_path / "data"), candidates=(str(valid),), output_dir=str(tmp_path / "r"),
      item_embeddings=str(embeddings_file(tmp_path / "e.npy", data)), eval_users_fraction=0.5,
      negatives_per_user=0, num_shards=1))
  train, evaluation = read_split(m, mf.RANK_TRAIN), read_split(m, mf.RANK_EVAL)
  assert m.eval_split == mf.VALID
  assert len(set(train[mf.FEATURE_USER])) == len(set(evaluation[mf.FEATURE_USER])) == 1
  assert not set(train[mf.FEATURE_USER]) & set(evaluation[mf.FEATURE_USER])


def test_bad_inputs_are_named(tmp_path):
  data = pipeline.run(make_config(write_log(tmp_path / "raw"), tmp_path / "data",
                                  holdout="valid_test", max_seq_len=4))
  emb = str(embeddings_file(tmp_path / "emb.npy", data))
  valid = fake_retrieval(tmp_path / "v", data, mf.VALID, VALID_ROWS)
  test = fake_retrieval(tmp_path / "t", data, mf.TEST, TEST_ROWS)

  def run(candidates, out="out", item_embeddings=emb):
    return ranking.run(ranking.RankingConfig(
        data_dir=str(tmp_path / "data"), candidates=tuple(map(str, candidates)),
        output_dir=str(tmp_path / out), item_embeddings=item_embeddings, num_shards=1))

  with pytest.raises(ConfigError, match="eval_split=test"):
    run([valid])
  # Candidates from another data directory: the job's fingerprint differs.
  other = fake_retrieval(tmp_path / "o", data, mf.TEST, TEST_ROWS)
  job = json.loads((other / "job.json").read_text())
  (other / "job.json").write_text(json.dumps({**job, "data_fingerprint": "0" * 64}))
  with pytest.raises(DataError, match="another data directory"):
    run([valid, other])
  # An article the vocabulary does not know.
  unknown = fake_retrieval(tmp_path / "u", data, mf.TEST, TEST_ROWS + [(1, 999, 0.1, 3)])
  with pytest.raises(DataError, match="item_id 999"):
    run([valid, unknown])
  with pytest.raises(DataError, match="missing"):
    run([valid, test], item_embeddings=str(tmp_path / "nowhere.npy"))
  np.save(tmp_path / "short.npy", np.zeros((3, 2), np.float32))
  with pytest.raises(DataError, match="another item vocabulary"):
    run([valid, test], item_embeddings=str(tmp_path / "short.npy"))
  # No positive at all among the training candidates.
  no_hit = fake_retrieval(tmp_path / "n", data, mf.VALID, [(1, 10, 0.9, 1), (2, 12, 0.9, 1)])
  with pytest.raises(DataError, match="no positives"):
    run([no_hit, test])
  assert not (tmp_path / "out").exists()  # nothing half-written
  assert run([valid, test]).counts["examples_eval"] == len(TEST_ROWS)


def test_an_older_retrievals_article_id_column_reads_as_item_id(tmp_path):
  data = pipeline.run(make_config(write_log(tmp_path / "raw"), tmp_path / "data",
                                  holdout="valid_test", max_seq_len=4))
  items = Vocabulary.from_parquet(data.path(mf.ITEMS_FILE), "item_id")
  users = Vocabulary.from_parquet(data.path(mf.USERS_FILE), "user_id")
  current = ranking.read_candidates(fake_retrieval(tmp_path / "v2", data, mf.TEST, TEST_ROWS),
                                    data, items, users)
  # Version 1: no candidates_version in job.json, the item column named article_id.
  older = ranking.read_candidates(fake_retrieval(tmp_path / "v1", data, mf.TEST, TEST_ROWS,
                                                 version=1, item_column="article_id"),
                                  data, items, users)
  np.testing.assert_array_equal(older.item, current.item)
  np.testing.assert_array_equal(older.user, current.user)
  assert items.to_raw(current.item).tolist() == [13, 10, 13, 12]  # TEST_ROWS' articles
  # A current job.json over parts with the old name, and a version this code does not know.
  mixed = fake_retrieval(tmp_path / "mixed", data, mf.TEST, TEST_ROWS, item_column="article_id")
  with pytest.raises(DataError, match="cannot read candidate columns user_id, item_id"):
    ranking.read_candidates(mixed, data, items, users)
  newer = fake_retrieval(tmp_path / "v3", data, mf.TEST, TEST_ROWS, version=3)
  with pytest.raises(DataError, match="candidates_version 3, .*written by a newer retrieval"):
    ranking.read_candidates(newer, data, items, users)
