"""The installed binaries: flags, one-line errors, exit codes."""

import os
import subprocess
import sys

import pytest

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


def run(module, *args):
  return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                        env=ENV, timeout=120)


def test_preprocess_end_to_end(tiny_news_dir, tmp_path):
  out = tmp_path / "out"
  result = run("preprocess.main", "--source=news", f"--input={tiny_news_dir}",
               f"--output_dir={out}", "--holdout=valid_test", "--num_shards=2")
  assert result.returncode == 0, result.stderr
  assert "300 users, 400 items" in result.stdout
  assert "examples/s" in result.stderr  # progress lines
  assert (out / "manifest.json").exists()


@pytest.mark.parametrize("flag,message", [
    ("--max_seq_len=0", "--max_seq_len=0: must be >= 1"),
    ("--num_shards=0", "--num_shards=0: must be >= 1"),
])
def test_bad_flags_fail_with_one_line(tiny_news_dir, tmp_path, flag, message):
  result = run("preprocess.main", "--source=news", f"--input={tiny_news_dir}",
               f"--output_dir={tmp_path / 'out'}", flag)
  assert result.returncode == 2
  assert result.stderr.strip() == f"preprocess: error: {message}"
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags,message", [
    (["--delimiter=;;"], "--delimiter=';;': must be one character other than a quote or a line "
                         "break (or 'tab')"),
    (["--user_col=item"], "--user_col=item and --item_col=item name the same column; each flag "
                          "needs a column of its own"),
    (["--time_col=user"], "--user_col=user and --time_col=user name the same column; each flag "
                          "needs a column of its own"),
    (["--column_names=user,item,user"], "--column_names: 'user' appears 2 times; each column "
                                        "needs a name of its own"),
])
def test_csv_flags_that_cannot_name_columns_fail_with_one_line(tmp_path, flags, message):
  (tmp_path / "log.csv").write_text("user,item,ts\n1,2,3\n")
  result = run("preprocess.main", "--source=csv", f"--input={tmp_path / 'log.csv'}",
               "--user_col=user", "--item_col=item", f"--output_dir={tmp_path / 'out'}", *flags)
  assert result.returncode == 2
  assert result.stderr.strip() == f"preprocess: error: {message}"
  assert not (tmp_path / "out").exists()


def test_bad_input_fails_with_one_line_naming_the_file(tmp_path):
  (tmp_path / "log.txt").write_text("1 2\n1 \n")  # string ids are fine, an empty one is not
  result = run("preprocess.main", "--source=sasrec_txt", f"--input={tmp_path / 'log.txt'}",
               f"--output_dir={tmp_path / 'out'}")
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      f"preprocess: error: {tmp_path / 'log.txt'}: column 'item' line 2: empty id")
  assert not (tmp_path / "out").exists()


def test_csv_source_requires_columns(tmp_path):
  result = run("preprocess.main", "--source=csv", f"--input={tmp_path}",
               f"--output_dir={tmp_path / 'out'}")
  assert result.returncode == 2
  assert "--source=csv needs --user_col and --item_col" in result.stderr


def test_retrieval_needs_its_directories():
  result = run("retrieval.main")
  assert result.returncode == 2
  assert result.stderr.strip() == "retrieval: error: --data_dir is required"
