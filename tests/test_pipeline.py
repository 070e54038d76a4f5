"""The whole preprocess job: outputs checked against an independent reference."""

import collections
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

from conftest import make_config, small_tmpfs
from contracts import fileio, locks
from contracts import manifest as mf
from contracts.errors import DataError
from contracts.vocab import Vocabulary
from preprocess import pipeline, tfrecord_writer


def read_split(manifest, split):
  """All examples of a split as numpy arrays, and per-shard counts."""
  spec = {name: tf.io.FixedLenFeature(shape, tf.int64)
          for name, shape in manifest.feature_shapes.items()}
  per_shard, parts = [], []
  for path in manifest.shard_paths(split):
    dataset = tf.data.TFRecordDataset(str(path), compression_type=manifest.tfrecord_compression)
    batches = [tf.io.parse_example(b, spec) for b in dataset.batch(1024)]
    per_shard.append(sum(len(b[mf.FEATURE_TARGET]) for b in batches))
    parts += batches
  return {name: np.concatenate([p[name].numpy() for p in parts]) for name in spec}, per_shard


def reference_examples(clicks, holdout, max_len):
  """The notebooks' loops, written plainly: (user, history, target) per split."""
  clicks = clicks.reset_index().sort_values(["user_id", "click_timestamp", "index"])
  held = {"last": 1, "valid_test": 2}[holdout]
  out = collections.defaultdict(list)
  for user, group in clicks.groupby("user_id"):
    items = group["click_article_id"].tolist()
    train = items[:-held] if len(items) > held else items
    for t in range(1, len(train)):
      out["train"].append((user, tuple(train[max(0, t - max_len):t]), train[t]))
    if len(items) > held:
      seen = list(train)
      for split, target in zip(["valid", "test"], items[len(train):]):
        out[split].append((user, tuple(seen[-max_len:]), target))
        seen.append(target)
  return out


def to_raw_tuples(manifest, examples):
  users = Vocabulary.from_parquet(manifest.path(mf.USERS_FILE), "user_id")
  items = Vocabulary.from_parquet(manifest.path(mf.ITEMS_FILE), "item_id")
  rows = []
  for user, hist, length, target in zip(examples["user"], examples["history"],
                                        examples["length"], examples["target"]):
    real = hist[len(hist) - length:]
    assert (hist[:len(hist) - length] == 0).all()  # left padding
    assert (real > 0).all()
    rows.append((int(users.to_raw([user])[0]), tuple(items.to_raw(real).tolist()),
                 int(items.to_raw([target])[0])))
  return rows


@pytest.mark.parametrize("holdout", ["last", "valid_test"])
def test_examples_equal_the_reference_on_the_tiny_log(tiny_news_dir, tmp_path, holdout):
  manifest = pipeline.run(make_config(tiny_news_dir, tmp_path / "out", holdout=holdout,
                                      max_seq_len=5))
  clicks = pd.read_csv(tiny_news_dir / "train_click_log.csv")
  expected = reference_examples(clicks, holdout, 5)
  assert set(manifest.splits) == {"train", *mf.HOLDOUT_SPLITS[holdout]}
  for split in manifest.splits:
    examples, _ = read_split(manifest, split)
    got = to_raw_tuples(manifest, examples)
    assert collections.Counter(got) == collections.Counter(expected[split]), split
    items = pq.read_table(manifest.path(mf.ITEMS_FILE)).to_pandas()
    np.testing.assert_array_equal(examples["target_category"],
                                  items["category"].to_numpy()[examples["target"]])


def test_tfrecords_match_the_manifest(tiny_data):
  manifest = mf.load(tiny_data.data_dir)
  assert manifest == tiny_data
  for split, info in manifest.splits.items():
    manifest.verify_shards(split, checksums=True)
    examples, per_shard = read_split(manifest, split)
    assert per_shard == [s.num_examples for s in info.shards]
    assert len(examples["target"]) == info.num_examples == manifest.counts[f"examples_{split}"]
    assert examples["history"].shape[1] == manifest.max_seq_len
    assert examples["user"].max() < manifest.vocab_sizes["users"]
    assert examples["target"].max() < manifest.vocab_sizes["items"]
  # Equal shards: sizes differ by at most one example.
  sizes = [s.num_examples for s in manifest.splits["train"].shards]
  assert max(sizes) - min(sizes) <= 1


def test_training_examples_are_shuffled_across_shards(tiny_data):
  examples, _ = read_split(tiny_data, "train")
  # In user order the user index would never decrease; shuffled it does often.
  assert (np.diff(examples["user"]) < 0).mean() > 0.3
  first_shard_users = set(read_split_first_shard(tiny_data))
  assert len(first_shard_users) > 0.5 * tiny_data.counts["users"]


def read_split_first_shard(manifest):
  spec = {"user": tf.io.FixedLenFeature([], tf.int64)}
  dataset = tf.data.TFRecordDataset(str(manifest.shard_paths("train")[0]), "GZIP")
  return np.concatenate([tf.io.parse_example(b, spec)["user"].numpy()
                         for b in dataset.batch(4096)])


def test_vocabulary_tables(tiny_data, tiny_news_dir):
  items = pq.read_table(tiny_data.path(mf.ITEMS_FILE)).to_pandas()
  assert tuple(items.columns) == mf.ITEM_COLUMNS
  assert items["index"].tolist() == list(range(len(items)))
  assert pd.isna(items.loc[0, "item_id"]) and items.loc[0, "category"] == 0
  # Index order is popularity order (training clicks, descending).
  assert (np.diff(items["train_clicks"].to_numpy()[1:]) <= 0).all()
  # Every article is in the vocabulary with its features, clicked or not.
  articles = pd.read_csv(tiny_news_dir / "articles.csv")
  merged = items.iloc[1:].merge(articles, left_on="item_id", right_on="article_id",
                                suffixes=("", "_src"))
  assert len(merged) == len(articles) == tiny_data.counts["items"]
  assert (merged["category_id"] == merged["category_id_src"]).all()
  assert (merged["words_count"] == merged["words_count_src"]).all()
  categories = pq.read_table(tiny_data.path(mf.CATEGORIES_FILE)).to_pandas()
  assert categories["num_items"].sum() == len(items) - 1
  assert tiny_data.counts["categories"] == articles["category_id"].nunique()
  # logQ frequencies: positions mode predicts every training click but each user's first.
  assert items["target_count"].sum() == tiny_data.counts["examples_train"]


def test_user_histories(tiny_data, tiny_news_dir):
  hist = pq.read_table(tiny_data.path(mf.USER_HISTORIES_FILE)).to_pandas()
  assert tuple(hist.columns) == mf.HISTORY_COLUMNS
  clicks = pd.read_csv(tiny_news_dir / "train_click_log.csv").sort_values(
      ["user_id", "click_timestamp"], kind="stable")
  items = Vocabulary.from_parquet(tiny_data.path(mf.ITEMS_FILE), "item_id")
  some = hist.sample(20, random_state=0)
  for row in some.itertuples():
    raw = clicks.loc[clicks.user_id == row.user_id, "click_article_id"].tolist()
    full = list(items.to_raw(row.history)) + [
        int(items.to_raw([i])[0]) for i in (row.valid_item, row.test_item) if i > 0]
    assert full == raw


def log_frame(rows):
  return pd.DataFrame(rows, columns=["user_id", "click_article_id", "click_timestamp"])


def write_news(directory, clicks, articles=None):
  directory.mkdir(parents=True, exist_ok=True)
  clicks.to_csv(directory / "train_click_log.csv", index=False)
  if articles is None:
    ids = sorted(set(clicks["click_article_id"]))
    articles = pd.DataFrame({"article_id": ids, "category_id": [i % 2 for i in ids],
                             "created_at_ts": 0, "words_count": 100})
  articles.to_csv(directory / "articles.csv", index=False)
  return directory


def test_cleaning_counts_on_a_hand_written_log(tmp_path):
  # user 1: unsorted (time 30 before 20), with an exact duplicate row;
  # user 2: one click; user 3: three clicks, tie at time 5 keeps file order.
  raw = write_news(tmp_path / "raw", log_frame([
      (1, 10, 30), (1, 11, 20), (1, 12, 40), (1, 12, 40),
      (2, 10, 5),
      (3, 13, 5), (3, 14, 5), (3, 10, 7),
  ]))
  manifest = pipeline.run(make_config(raw, tmp_path / "out"))
  c = manifest.counts
  assert c["input_rows"] == 8
  assert c["duplicate_rows_dropped"] == 1
  assert c["out_of_order_rows"] == 1
  assert c["clicks"] == 7
  assert c["users"] == 3
  assert c["users_without_holdout"] == 1  # user 2
  assert c["train_clicks"] == 5  # 11 10 | 10 | 13 14
  hist = pq.read_table(manifest.path(mf.USER_HISTORIES_FILE)).to_pandas()
  items = Vocabulary.from_parquet(manifest.path(mf.ITEMS_FILE), "item_id")
  assert [items.to_raw(h).tolist() for h in hist["history"]] == [[11, 10], [10], [13, 14]]
  assert items.to_raw(hist["valid_item"][[0, 2]]).tolist() == [12, 10]
  assert hist["valid_item"][1] == 0 and pd.isna(hist["valid_ts"][1])
  # Item 10 has 2 training clicks, 11/13/14 one each (ties by raw id), 12 none.
  assert items.raw_ids.tolist() == [10, 11, 13, 14, 12]


def test_items_missing_from_or_only_in_the_articles_file(tmp_path):
  clicks = log_frame([(1, 10, 1), (1, 11, 2), (1, 99, 3)])  # 99 has no article row
  articles = pd.DataFrame({"article_id": [10, 11, 12], "category_id": [5, 6, 6],
                           "created_at_ts": 0, "words_count": 1})  # 12 is never clicked
  manifest = pipeline.run(make_config(write_news(tmp_path / "raw", clicks, articles),
                                      tmp_path / "out"))
  c = manifest.counts
  assert (c["items"], c["clicked_items"], c["items_without_clicks"],
          c["items_without_features"], c["categories"]) == (4, 3, 1, 1, 2)
  items = pq.read_table(manifest.path(mf.ITEMS_FILE)).to_pandas().set_index("item_id")
  assert items.loc[99, "category"] == 0 and pd.isna(items.loc[99, "category_id"])
  assert items.loc[12, "category"] == 2 and items.loc[12, "train_clicks"] == 0


def test_min_clicks_filters(tmp_path):
  clicks = log_frame([(1, 10, 1), (1, 11, 2), (1, 10, 3), (2, 10, 1), (2, 12, 2), (3, 11, 1)])
  articles = pd.DataFrame({"article_id": [10, 11, 12, 13], "category_id": 1,
                           "created_at_ts": 0, "words_count": 1})
  raw = write_news(tmp_path / "raw", clicks, articles)
  manifest = pipeline.run(make_config(raw, tmp_path / "out", min_item_clicks=2,
                                      min_user_clicks=2))
  c = manifest.counts
  # Items 12 (1 click) and 13 (never clicked) go first, then user 2 (1 click
  # left) and user 3 (1 click).
  assert c["rows_dropped_min_item_clicks"] == 1
  assert c["users_dropped_min_user_clicks"] == 2
  assert c["rows_dropped_min_user_clicks"] == 2
  assert (c["clicks"], c["users"], c["items"]) == (3, 1, 2)


def test_overwrite_replaces_only_its_own_output(tiny_news_dir, tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("x")
  with pytest.raises(DataError, match="not empty.*--overwrite"):
    pipeline.run(make_config(tiny_news_dir, out))
  with pytest.raises(DataError, match=f"^{out}: --overwrite refused: it is not a preprocess "
                                      r"output \(no manifest.json\) and holds keep.txt;"):
    pipeline.run(make_config(tiny_news_dir, out, overwrite=True))
  assert (out / "keep.txt").read_text() == "x"
  (out / "keep.txt").unlink()
  pipeline.run(make_config(tiny_news_dir, out))  # an empty directory is taken
  first = json.loads((out / mf.MANIFEST_FILE).read_text())
  pipeline.run(make_config(tiny_news_dir, out, overwrite=True))  # its own output is replaced
  second = json.loads((out / mf.MANIFEST_FILE).read_text())
  assert (first["flags"]["overwrite"], second["flags"]["overwrite"]) == (False, True)
  assert second["counts"] == first["counts"]
  assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporaries left


def test_an_output_dir_holding_the_input_is_refused(tiny_news_dir, tmp_path):
  out = tmp_path / "out"
  pipeline.run(make_config(tiny_news_dir, out))
  raw = out / "raw"
  shutil.copytree(tiny_news_dir, raw)
  # Its own output, --overwrite given: still refused, because it holds the input.
  with pytest.raises(DataError, match=f"^{out}: holds the input {raw}, which replacing it"):
    pipeline.run(make_config(raw, out, overwrite=True))
  assert sorted(p.name for p in raw.iterdir()) == sorted(p.name for p in tiny_news_dir.iterdir())


@pytest.mark.parametrize("existing", [False, True])
def test_failure_leaves_no_partial_output(tiny_news_dir, tmp_path, monkeypatch, existing):
  out = tmp_path / "out"
  if existing:
    pipeline.run(make_config(tiny_news_dir, out))
    before = (out / mf.MANIFEST_FILE).read_text()
  calls = []

  def failing_write(self, features):
    calls.append(1)
    if len(calls) == 2:
      raise OSError("disk full")
    return original(self, features)

  original = tfrecord_writer.TFRecordFileWriter.write_examples
  monkeypatch.setattr(tfrecord_writer.TFRecordFileWriter, "write_examples", failing_write)
  with pytest.raises(DataError, match=f"^{out}: cannot write the output \\(disk full\\); "
                                      "nothing was written"):
    pipeline.run(make_config(tiny_news_dir, out, overwrite=True))
  assert len(calls) == 2
  if existing:
    assert (out / mf.MANIFEST_FILE).read_text() == before  # old output untouched
  else:
    assert not out.exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if existing else [])


def test_a_second_job_on_the_same_output_is_refused_and_killed_runs_are_cleaned(
    tiny_news_dir, tmp_path):
  out = tmp_path / "out"
  with locks.exclusive_file(fileio.output_lock_path(out), "preprocess", out):
    with pytest.raises(locks.DirectoryLocked, match=f"^{out} is in use by another preprocess "):
      pipeline.run(make_config(tiny_news_dir, out))
  assert not out.exists()
  # What a kill -9 leaves beside the output: a half-built and a replaced copy.
  (tmp_path / ".out.tmp-dead1").mkdir()
  (tmp_path / ".out.tmp-dead1" / "vocab").mkdir()
  (tmp_path / ".out.old-1234").mkdir()
  (tmp_path / ".other.tmp-x").mkdir()  # another output's: not this job's to remove
  pipeline.run(make_config(tiny_news_dir, out))
  assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-x", "out"]


def test_an_output_that_cannot_be_created_fails_before_the_input_is_read(tmp_path):
  garbage = tmp_path / "raw"
  garbage.mkdir()
  (garbage / "train_click_log.csv").write_text("not,a\nlog")
  for out in ("/proc/no_such_dir/out", "/proc/out"):
    with pytest.raises(DataError, match=f"^{out.rsplit('/', 1)[0]}: cannot create or lock it"):
      pipeline.run(make_config(garbage, out))


def test_bad_input_leaves_no_output(tmp_path):
  raw = write_news(tmp_path / "raw", log_frame([(1, 10, 1), (2, 11, 1)]))
  with pytest.raises(DataError, match="no train examples"):
    pipeline.run(make_config(raw, tmp_path / "out"))
  assert not (tmp_path / "out").exists()


def test_output_is_deterministic_and_seeded(tiny_news_dir, tmp_path):
  runs = [pipeline.run(make_config(tiny_news_dir, tmp_path / name, seed=seed))
          for name, seed in (("a", 1), ("b", 1), ("c", 2))]
  sha = [{s: [x.sha256 for x in info.shards] for s, info in m.splits.items()} for m in runs]
  assert sha[0] == sha[1]
  assert sha[0]["train"] != sha[2]["train"]  # another shuffle
  assert sha[0]["valid"] == sha[2]["valid"]  # evaluation examples are not shuffled


def test_parallel_writers_give_identical_output(tiny_news_dir, tmp_path):
  serial = pipeline.run(make_config(tiny_news_dir, tmp_path / "a", num_workers=1))
  parallel = pipeline.run(make_config(tiny_news_dir, tmp_path / "b", num_workers=2))
  assert serial.splits == parallel.splits


def test_windows_samples(tiny_news_dir, tmp_path):
  manifest = pipeline.run(make_config(tiny_news_dir, tmp_path / "w", samples="windows",
                                      max_seq_len=4))
  examples, _ = read_split(manifest, "train")
  items = pq.read_table(manifest.path(mf.ITEMS_FILE)).to_pandas()
  # Every training click but each user's first is predicted exactly once
  # (every user has at least one training click).
  assert items["target_count"].sum() == manifest.counts["train_clicks"] - manifest.counts["users"]
  # A window's positions predict history[1:] + [target]: as many targets as
  # history length in total.
  assert examples["length"].sum() == items["target_count"].sum()
  assert manifest.samples == "windows"


def test_manifest_load_errors(tiny_data, tmp_path):
  with pytest.raises(DataError, match="no manifest.json"):
    mf.load(tmp_path)
  bad = json.loads(tiny_data.path(mf.MANIFEST_FILE).read_text())
  bad["schema_version"] = 999
  (tmp_path / mf.MANIFEST_FILE).write_text(json.dumps(bad))
  with pytest.raises(DataError, match="schema_version 999"):
    mf.load(tmp_path)
  (tmp_path / mf.MANIFEST_FILE).write_text("{not json")
  with pytest.raises(DataError, match="not valid JSON"):
    mf.load(tmp_path)


def test_damaged_shard_is_named(tiny_news_dir, tmp_path):
  manifest = pipeline.run(make_config(tiny_news_dir, tmp_path / "out"))
  shard = manifest.shard_paths("train")[1]
  data = shard.read_bytes()
  shard.write_bytes(data[:-10])
  with pytest.raises(DataError, match=f"{shard.name}: shard is .* bytes, manifest says"):
    manifest.verify_shards("train")
  shard.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
  manifest.verify_shards("train")  # same size: only the checksum sees it
  with pytest.raises(DataError, match=f"{shard.name}: SHA-256 differs"):
    manifest.verify_shards("train", checksums=True)


@pytest.mark.slow
def test_disk_full_in_a_forked_shard_writer_ends_with_one_error_and_no_temporary(
    tiny_news_dir, tmp_path):
  # Every shard in turn is the one that meets the full disk, so the failure
  # arrives early, late and while the other writer is idle. The loop runs in a
  # subprocess with a timeout: a hang fails the test instead of stalling it.
  script = textwrap.dedent(f"""
      import errno
      from pathlib import Path
      from preprocess import pipeline
      from contracts.errors import DataError
      from tests.conftest import make_config

      write_shard = pipeline._write_shard
      for n in range(16):
        def full_disk(job, n=n):
          split, shard, num_shards, _ = job
          if (shard + (num_shards if split != "train" else 0)) == n % (2 * num_shards):
            raise OSError(errno.ENOSPC, "No space left on device")
          return write_shard(job)
        pipeline._write_shard = full_disk
        out = Path({str(tmp_path)!r}) / "out"
        try:
          pipeline.run(make_config(Path({str(tiny_news_dir)!r}), out, num_shards=8,
                                   num_workers=2, holdout="valid_test"))
        except DataError as e:
          assert "cannot write the output (No space left on device)" in str(e), e
        else:
          raise AssertionError("no error")
        left = sorted(p.name for p in Path({str(tmp_path)!r}).iterdir())
        assert left == [], left
      print("ok")
      """)
  result = subprocess.run([sys.executable, "-c", script], capture_output=True,
                          text=True, timeout=180, cwd=Path(__file__).parent.parent)
  assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


@pytest.mark.slow
def test_a_really_full_disk_with_two_writers_is_one_line_and_leaves_the_disk_empty(
    tiny_news_dir, tmp_path):
  small = tmp_path / "small"
  with small_tmpfs(small, "320k"):  # the vocabularies fit, the shards do not
    for _ in range(4):
      result = subprocess.run(
          [sys.executable, "-m", "preprocess.main", "--source=news",
           f"--input={tiny_news_dir}", f"--output_dir={small / 'out'}", "--num_shards=8",
           "--num_workers=2", "--compression=NONE"],
          capture_output=True, text=True, timeout=120)
      assert result.returncode == 1, result.stderr[-2000:]
      lines = result.stderr.strip().splitlines()
      assert lines[-1].startswith(f"preprocess: error: {small / 'out'}: cannot write the "
                                  "output (No space left on device)"), lines[-3:]
      assert not [line for line in lines if "Traceback" in line]
      assert list(small.iterdir()) == []


@pytest.mark.parametrize("source, name, text", [
    ("sequences", "log.txt", "u1 a b c d\nu2 b c e\n"),
    ("jsonl", "log.json", "".join(
        f'{{"u": "{u}", "i": "{i}", "t": {t}}}\n' for t, (u, i) in enumerate(
            [("u1", "a"), ("u2", "b"), ("u1", "b"), ("u2", "c"), ("u1", "c"), ("u2", "e"),
             ("u1", "d")]))),
    ("recbole", "log.inter", "u:token\ti:token\tt:float\n" + "".join(
        f"{u}\t{i}\t{t}.0\n" for t, (u, i) in enumerate(
            [("u1", "a"), ("u1", "b"), ("u2", "b"), ("u1", "c"), ("u2", "c"), ("u1", "d"),
             ("u2", "e")]))),
])
def test_new_sources_give_the_expected_examples(tmp_path, source, name, text):
  path = tmp_path / name
  path.write_text(text)
  options = pipeline.readers.CsvOptions(user_col="u", item_col="i", time_col="t") \
      if source != "sequences" else None
  manifest = pipeline.run(pipeline.PreprocessConfig(
      source=source, input=str(path), output_dir=str(tmp_path / "out"), num_shards=1,
      num_workers=1, holdout="valid_test", max_seq_len=3, csv=options))
  users = Vocabulary.from_parquet(manifest.path(mf.USERS_FILE), "user_id")
  items = Vocabulary.from_parquet(manifest.path(mf.ITEMS_FILE), "item_id")

  def raw(split):
    examples, _ = read_split(manifest, split)
    return sorted((users.to_raw([u])[0], tuple(items.to_raw(h[len(h) - n:])), items.to_raw([t])[0])
                  for u, h, n, t in zip(examples["user"], examples["history"],
                                        examples["length"], examples["target"]))
  # u1: a b | c (valid) | d (test); u2: b | c | e. Positions: one example per target.
  assert raw("train") == [("u1", ("a",), "b")]
  assert raw("valid") == [("u1", ("a", "b"), "c"), ("u2", ("b",), "c")]
  assert raw("test") == [("u1", ("a", "b", "c"), "d"), ("u2", ("b", "c"), "e")]
