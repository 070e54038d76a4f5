"""preprocess --engine=ray on a local 2-CPU Ray (conftest's local_ray): the default
engine's vocabularies, histories and counts, and its examples as a multiset."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

from conftest import environment_without
from contracts import manifest as mf
from contracts.errors import ConfigError, DataError
from preprocess import pipeline, readers

ray = pytest.importorskip("ray")
from preprocess import ray_engine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# One xdist worker runs every test that starts Ray (conftest's local_ray).
RAY = [pytest.mark.slow, pytest.mark.xdist_group("cluster")]
PARQUET_FILES = (mf.ITEMS_FILE, mf.USERS_FILE, mf.CATEGORIES_FILE, mf.USER_HISTORIES_FILE)


def records(manifest: mf.Manifest, split: str) -> list[bytes]:
  """Every serialized example of a split, sorted: the split as a multiset."""
  out = []
  for shard in manifest.splits[split].shards:
    out += [r.numpy() for r in tf.data.TFRecordDataset(
        str(manifest.path(shard.path)), compression_type=manifest.compression or None)]
  return sorted(out)


def assert_same_output(got: mf.Manifest, want: mf.Manifest):
  assert got.counts == want.counts
  assert got.vocab_sizes == want.vocab_sizes
  assert got.source == want.source
  for name in PARQUET_FILES:
    table, expected = pq.read_table(got.path(name)), pq.read_table(want.path(name))
    assert table.schema == expected.schema, name
    assert table.equals(expected), name
    assert pq.ParquetFile(got.path(name)).num_row_groups == \
        pq.ParquetFile(want.path(name)).num_row_groups, name
  assert list(got.splits) == list(want.splits)
  for split in want.splits:
    assert len(got.splits[split].shards) == len(want.splits[split].shards)
    assert records(got, split) == records(want, split), split
    for shard in got.splits[split].shards:  # the manifest describes the files
      assert got.path(shard.path).stat().st_size == shard.bytes


def both_engines(config: pipeline.PreprocessConfig, tmp_path: Path, ray_input: str = "",
                 partitions: int = 3) -> tuple[mf.Manifest, mf.Manifest]:
  default = pipeline.run(dataclasses.replace(config, output_dir=str(tmp_path / "default")))
  on_ray = ray_engine.run(dataclasses.replace(config, output_dir=str(tmp_path / "ray"),
                                              input=ray_input or config.input),
                          num_partitions=partitions)
  return on_ray, default


@pytest.mark.parametrize("samples,filters", [
    ("positions", {}),
    ("windows", {"min_item_clicks": 6, "min_user_clicks": 8})])
@pytest.mark.slow
@pytest.mark.xdist_group("cluster")
def test_the_news_log_gives_the_default_engines_output(local_ray, tiny_news_dir, tmp_path,
                                                       samples, filters):
  config = pipeline.PreprocessConfig(**{
      "source": "news", "input": str(tiny_news_dir), "output_dir": "", "num_shards": 3,
      "num_workers": 1, "holdout": "valid_test", "samples": samples, "max_seq_len": 8,
      **filters})
  on_ray, default = both_engines(config, tmp_path)
  assert_same_output(on_ray, default)
  if filters:  # the filters did something, as they would on the default engine
    assert default.counts["rows_dropped_min_item_clicks"] > 0
    assert default.counts["users_dropped_min_user_clicks"] > 0


@pytest.fixture(scope="module")
def messy_log(tiny_news_dir) -> pd.DataFrame:
  """The tiny log with string ids (some digits with a leading zero), rows out
  of time order, exact duplicates and clicks tied in time."""
  clicks = pd.read_csv(tiny_news_dir / "train_click_log.csv")
  log = pd.DataFrame({
      "user": "u_" + clicks.user_id.astype(str),
      "item": np.where(clicks.click_article_id % 5 == 0,
                       "0" + clicks.click_article_id.astype(str),
                       "B0" + clicks.click_article_id.astype(str)),
      "ts": clicks.click_timestamp // 10_000_000,  # coarse: many clicks share a time
  })
  rng = np.random.default_rng(0)
  log = pd.concat([log, log.sample(200, random_state=1)])  # exact duplicates
  return log.iloc[rng.permutation(len(log))].reset_index(drop=True)


@pytest.mark.slow
@pytest.mark.xdist_group("cluster")
def test_string_ids_in_several_files_give_the_default_engines_output(local_ray, messy_log,
                                                                     tmp_path, monkeypatch):
  monkeypatch.setattr(ray_engine, "USERS_PER_BATCH", 7)  # blocks cut into many batches
  single = tmp_path / "log.csv"
  messy_log.to_csv(single, index=False)
  # The same rows in two files, CSV then Parquet: the files in name order are the log.
  parts = tmp_path / "parts"
  parts.mkdir()
  half = len(messy_log) // 2
  messy_log.iloc[:half].to_csv(parts / "a.csv", index=False)
  pq.write_table(pa.Table.from_pandas(messy_log.iloc[half:], preserve_index=False),
                 parts / "b.parquet")
  config = pipeline.PreprocessConfig(
      source="csv", input=str(single), output_dir="", num_shards=2, num_workers=1,
      holdout="valid_test", max_seq_len=8, min_item_clicks=3, min_user_clicks=4,
      csv=readers.CsvOptions(user_col="user", item_col="item", time_col="ts"))
  on_ray, default = both_engines(config, tmp_path, ray_input=str(parts), partitions=4)
  for key in ("duplicate_rows_dropped", "out_of_order_rows", "rows_dropped_min_item_clicks"):
    assert default.counts[key] > 0, key  # the log exercises what it is meant to
  assert default.source["id_types"] == {"user": "string", "item": "string"}
  # The inputs differ by construction (two files against one); the rest is equal.
  on_ray.source["inputs"] = default.source["inputs"]
  assert_same_output(on_ray, default)


@pytest.mark.slow
@pytest.mark.xdist_group("cluster")
def test_a_bad_row_read_by_a_task_is_one_error_naming_its_line_and_leaves_no_output(
    local_ray, messy_log, tmp_path):
  log = messy_log.copy()
  log.loc[1234, "item"] = ""
  path = tmp_path / "log.csv"
  log.to_csv(path, index=False)
  out = tmp_path / "out"
  config = pipeline.PreprocessConfig(
      source="csv", input=str(path), output_dir=str(out), num_workers=1,
      csv=readers.CsvOptions(user_col="user", item_col="item", time_col="ts"))
  with pytest.raises(DataError) as default:
    pipeline.run(config)
  with pytest.raises(DataError) as on_ray:
    ray_engine.run(config, num_partitions=2)
  # Line 1236: the header, then rows 0..1234.
  assert str(default.value) == f"{path}: column 'item' line 1236: empty id"
  assert str(on_ray.value) == str(default.value)
  assert type(on_ray.value) is DataError
  assert sorted(p.name for p in tmp_path.iterdir()) == ["log.csv"]


def test_a_shard_the_hash_left_empty_is_an_empty_file_in_the_manifest(tmp_path):
  # Shard 0 of 2 was written by a task; shard 1 got no example.
  (tmp_path / mf.VALID).mkdir()
  written = ray_engine._write_tfrecords(
      tmp_path, mf.shard_file_name(mf.VALID, 0, 2, "GZIP"), "GZIP",
      pa.table({mf.FEATURE_USER: pa.array([7], pa.int32()),
                mf.FEATURE_HISTORY: pa.FixedSizeListArray.from_arrays(
                    pa.array([0, 3], pa.int32()), 2),
                mf.FEATURE_LENGTH: pa.array([1], pa.int32()),
                mf.FEATURE_TARGET: pa.array([5], pa.int32()),
                mf.FEATURE_TARGET_CATEGORY: pa.array([0], pa.int32())}))
  splits = ray_engine._split_infos(tmp_path, [dataclasses.asdict(written)], {mf.VALID: 2},
                                   "GZIP")
  shards = splits[mf.VALID].shards
  assert [s.num_examples for s in shards] == [1, 0] and splits[mf.VALID].num_examples == 1
  empty = tmp_path / shards[1].path
  assert empty.stat().st_size == shards[1].bytes
  assert list(tf.data.TFRecordDataset(str(empty), compression_type="GZIP")) == []


def test_sources_it_does_not_read_are_a_config_error_before_ray_starts(tmp_path):
  config = pipeline.PreprocessConfig(source="movielens", input=str(tmp_path / "ratings.dat"),
                                     output_dir=str(tmp_path / "out"))
  with pytest.raises(ConfigError, match=r"^--engine=ray reads --source=csv or news, not "
                                        r"--source=movielens; use the default engine for it$"):
    ray_engine.run(config)
  assert not (tmp_path / "out").exists()


def test_without_ray_the_engine_is_a_one_line_error_naming_the_extra(tmp_path, tiny_news_dir):
  result = subprocess.run(
      [sys.executable, "-m", "preprocess.main", "--engine=ray", "--source=news",
       f"--input={tiny_news_dir}", f"--output_dir={tmp_path / 'out'}"],
      capture_output=True, text=True, cwd=ROOT, env=environment_without("ray", tmp_path))
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      "preprocess: error: --engine=ray needs Ray (No module named ray); install it with "
      "pip install -e '.[ray]'")
  assert not (tmp_path / "out").exists()


def clicks_csv(path: Path, rows: list[tuple], header: str = "user,item,ts") -> Path:
  path.write_text(header + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
  return path


def a_log(users=(1, 2, 3, 4, 5), clicks: int = 6, start: int = 1600000000) -> list[list]:
  """`clicks` clicks a minute apart for each user, users one after the other."""
  return [[u, 10 + k + i, start + 60 * (i * clicks + k)]
          for i, u in enumerate(users) for k in range(clicks)]


@pytest.mark.slow
@pytest.mark.xdist_group("cluster")
def test_both_engines_refuse_and_accept_the_same_inputs(local_ray, tmp_path):
  def config(path, out="out"):
    return pipeline.PreprocessConfig(
        source="csv", input=str(path), output_dir=str(tmp_path / out), num_workers=1,
        num_shards=2, csv=readers.CsvOptions(user_col="user", item_col="item", time_col="ts"))

  # Ids at the int64 limits, negative ids, and 2^63, which only a string holds:
  # the users stay int64, the items become strings in both engines.
  log = a_log(users=(2**63 - 1, -2**63, -5, 0, 7))
  log[3][1], log[4][1] = 2**63, -2**63
  ids = clicks_csv(tmp_path / "ids.csv", log)
  on_ray, default = both_engines(config(ids, ""), tmp_path, partitions=2)
  assert default.source["id_types"] == {"user": "int64", "item": "string"}
  assert_same_output(on_ray, default)

  refused = {}
  dates = [[u, i, f"2020-01-{k % 28 + 1:02d}"] for k, (u, i, _) in enumerate(a_log())]
  dates[7][2] = "13/01/2020"  # day first among ISO dates: line 9
  refused["dates.csv"] = "column 'ts': line 9: '13/01/2020' is not in the format of line 2: " \
                         "'2020-01-01': one date format per column (or pass --time_format)"
  clicks_csv(tmp_path / "dates.csv", dates)
  refused["header.csv"] = "the click log has no rows"
  clicks_csv(tmp_path / "header.csv", [])
  # User 3's clicks in milliseconds (lines 14-19), the others' in seconds, in
  # another partition of users on Ray: only the driver sees both units.
  units = a_log()
  for row in units[12:18]:
    row[2] *= 1000
  partition = ray_engine.partition_of(pa.array(["1", "3"]), 2)
  assert partition[0] != partition[1]
  refused["units.csv"] = ("column 'ts' mixes epoch seconds (line 2: 1600000000) and epoch "
                          "milliseconds (line 14: 1600000720000), 1000x apart: write the column "
                          "in one unit (or pass --time_unit=order if it counts events rather "
                          "than telling time)")
  clicks_csv(tmp_path / "units.csv", units)
  refused["twice.csv"] = ("column 'ts' appears 2 times in the header (user, item, ts, ts); which "
                          "one holds the data cannot be told")
  clicks_csv(tmp_path / "twice.csv", [r + [r[2]] for r in a_log()], "user,item,ts,ts")
  for name, message in refused.items():
    path = tmp_path / name
    with pytest.raises(DataError) as default_error:
      pipeline.run(config(path))
    with pytest.raises(DataError) as ray_error:
      ray_engine.run(config(path), num_partitions=2)
    assert str(default_error.value) == f"{path}: {message}", name
    assert str(ray_error.value) == str(default_error.value), name
    assert not (tmp_path / "out").exists(), name

  # A directory: the Ray engine reads its files; the default engine says it reads one.
  (tmp_path / "parts").mkdir()
  clicks_csv(tmp_path / "parts" / "a.csv", a_log())
  with pytest.raises(DataError, match=rf"^{tmp_path / 'parts'}: a directory; --source=csv reads "
                                      r"one file \(--engine=ray reads every CSV or Parquet file"):
    pipeline.run(config(tmp_path / "parts"))
  assert ray_engine.run(config(tmp_path / "parts"), num_partitions=2).counts["clicks"] == 30


@pytest.mark.slow
@pytest.mark.xdist_group("cluster")
def test_a_bad_input_on_the_ray_engine_shows_one_line_and_no_ray_traceback(tmp_path):
  log = a_log()
  log[2][1] = ""
  path = clicks_csv(tmp_path / "log.csv", log)
  result = subprocess.run(
      [sys.executable, "-m", "preprocess.main", "--engine=ray", "--source=csv",
       f"--input={path}", "--user_col=user", "--item_col=item", "--time_col=ts",
       f"--output_dir={tmp_path / 'out'}"], capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == \
      f"preprocess: error: {path}: column 'item' line 4: empty id"
  # Ray Data's own report of the failed task (its traceback, twice) stays in its log file.
  assert "Traceback" not in result.stderr and " ERROR " not in result.stderr, result.stderr
  assert sorted(p.name for p in tmp_path.iterdir()) == ["log.csv"]


@pytest.mark.slow
@pytest.mark.xdist_group("cluster")
def test_the_connection_probe_accepts_a_running_ray_head(local_ray):
  from contracts import ray_cluster
  port = int(local_ray.get_runtime_context().gcs_address.rsplit(":", 1)[1])
  # The GCS listens on every interface; 127.0.0.2 keeps the probe on loopback.
  ray_cluster.probe(f"127.0.0.2:{port}", timeout_s=5)
