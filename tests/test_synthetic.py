import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import make_config
from contracts.errors import DataError
from preprocess import pipeline, synthetic

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))
import baselines  # noqa: E402

TINY = synthetic.PRESETS["tiny"]


def test_same_config_gives_identical_files(tmp_path):
  a = synthetic.write(TINY, tmp_path / "a")
  b = synthetic.write(TINY, tmp_path / "b")
  c = synthetic.write(dataclasses.replace(TINY, seed=1), tmp_path / "c")
  for name in ("train_click_log.csv", "articles.csv"):
    assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / name).read_bytes() != (c / name).read_bytes()


def test_schema_and_sizes():
  log, articles = synthetic.generate(TINY)
  assert list(log.columns) == [
      "user_id", "click_article_id", "click_timestamp", "click_environment",
      "click_deviceGroup", "click_os", "click_country", "click_region", "click_referrer_type"]
  assert list(articles.columns) == ["article_id", "category_id", "created_at_ts", "words_count"]
  assert log["user_id"].nunique() == TINY.num_users
  assert len(articles) == TINY.num_items
  assert articles["category_id"].nunique() == TINY.num_categories
  assert log.groupby("user_id").size().min() >= TINY.min_clicks_per_user
  assert abs(len(log) / TINY.num_users - TINY.mean_clicks_per_user) < 0.25 * \
      TINY.mean_clicks_per_user
  assert set(log["click_article_id"]) <= set(articles["article_id"])
  # Articles exist before anyone clicks them; times increase within a user.
  created = articles.set_index("article_id")["created_at_ts"]
  assert (log["click_timestamp"].to_numpy() >
          created.loc[log["click_article_id"]].to_numpy()).all()
  assert (log.groupby("user_id")["click_timestamp"].diff().dropna() > 0).all()


def test_popularity_is_heavy_tailed():
  log, _ = synthetic.generate(synthetic.PRESETS["demo"])
  counts = np.sort(log["click_article_id"].value_counts().to_numpy())[::-1]
  top_share = counts[:len(counts) // 100].sum() / counts.sum()
  assert top_share > 0.10  # top 1% of items take >10% of clicks (uniform: 1%)


def test_sequential_structure_is_learnable(tiny_news_dir, tmp_path):
  """A first-order Markov model beats most-popular clearly on the held-out click."""
  manifest = pipeline.run(make_config(tiny_news_dir, tmp_path / "out"))
  results = baselines.evaluate(manifest, "valid", (10,))
  assert results["markov"]["hit_rate@10"] > 1.5 * results["most_popular"]["hit_rate@10"]


def test_no_sequential_signal_in_independent_clicks(tmp_path):
  """Control: when every click ignores the past (no successors, a fresh
  category drawn by popularity each time), the Markov advantage disappears."""
  config = dataclasses.replace(TINY, follow_prob=0.0, switch_prob=1.0, explore_prob=1.0,
                               num_users=600)
  raw = synthetic.write(config, tmp_path / "raw")
  manifest = pipeline.run(make_config(raw, tmp_path / "out"))
  results = baselines.evaluate(manifest, "valid", (10,))
  assert results["markov"]["hit_rate@10"] < 1.2 * results["most_popular"]["hit_rate@10"]


def _leave_one_out_follow_share(prev: np.ndarray, nxt: np.ndarray, rows: np.ndarray) -> float:
  """Mean over `rows` of #(prev -> nxt pairs) / #(pairs from prev), each row's own pair
  left out: how well the counts from `prev` predict `nxt`."""
  pair_keys, pair_inverse, pair_counts = np.unique(
      np.stack([prev, nxt], axis=1), axis=0, return_inverse=True, return_counts=True)
  del pair_keys
  _, prev_inverse, prev_counts = np.unique(prev, return_inverse=True, return_counts=True)
  same_pair = pair_counts[pair_inverse.ravel()][rows] - 1.0
  from_prev = prev_counts[prev_inverse.ravel()][rows] - 1.0
  return float(np.mean(same_pair / np.maximum(from_prev, 1.0)))


def test_after_an_interruption_the_click_before_it_predicts_the_next_click():
  """Interruptions leave the thread as it was: in the triples (a, b, c) of
  consecutive clicks where b is a trending interruption, the clicks that
  follow a two steps later predict c far better than the clicks that follow
  b; where b is a thread click, b predicts c better than a does (first order)."""
  config = dataclasses.replace(TINY, interrupt_prob=0.3, num_users=600)
  log, _ = synthetic.generate(config)
  trending = log.attrs["trending_article_ids"]
  assert len(trending) == config.trending_items
  log = log.sort_values(["user_id", "click_timestamp"], kind="stable")
  user, item = log["user_id"].to_numpy(), log["click_article_id"].to_numpy()
  # Triples (a, b, c) inside one user.
  triple = np.flatnonzero((user[2:] == user[:-2]))
  a, b, c = item[triple], item[triple + 1], item[triple + 2]
  interrupted = np.isin(b, trending) & ~np.isin(a, trending) & ~np.isin(c, trending)
  in_thread = ~np.isin(a, trending) & ~np.isin(b, trending) & ~np.isin(c, trending)
  assert interrupted.sum() > 500 and in_thread.sum() > 500
  rows = np.flatnonzero(interrupted)
  from_b, from_a = (_leave_one_out_follow_share(b, c, rows),
                    _leave_one_out_follow_share(a, c, rows))
  assert from_a > 3 * from_b, (from_a, from_b)
  rows = np.flatnonzero(in_thread)
  assert _leave_one_out_follow_share(b, c, rows) > _leave_one_out_follow_share(a, c, rows)


def test_interruptions_are_off_unless_asked_for():
  """Presets without interruptions draw nothing for them: tiny's log (which the
  tests' fixtures use) is the one generated before the option existed, and no
  pool is named."""
  log, _ = synthetic.generate(TINY)
  assert "trending_article_ids" not in log.attrs
  columns = log[["user_id", "click_article_id", "click_timestamp"]].to_numpy()
  assert hashlib.sha256(columns.tobytes()).hexdigest() == (
      "9df37629e5405405b372d2b11ca3d9d4f64ddf9239a25d1921aef566419a4890")


def test_invalid_config_is_refused():
  with pytest.raises(ValueError, match="follow_prob"):
    synthetic.generate(dataclasses.replace(TINY, follow_prob=0.9, switch_prob=0.2))
  with pytest.raises(ValueError, match="interrupt_prob"):
    synthetic.generate(dataclasses.replace(TINY, interrupt_prob=1.0))
  with pytest.raises(ValueError, match="trending_items"):
    synthetic.generate(dataclasses.replace(TINY, interrupt_prob=0.1, trending_items=0))


def test_overwrite_replaces_its_own_output_but_not_a_real_log_with_the_same_names(tmp_path):
  real = tmp_path / "real"
  real.mkdir()
  for name in ("train_click_log.csv", "articles.csv"):
    (real / name).write_text("a real log\n")
  with pytest.raises(DataError, match=f"^{real}: --overwrite refused: it is not a synthetic "
                                      r"data output \(no synthetic.json\)"):
    synthetic.write(TINY, real, overwrite=True)
  assert (real / "articles.csv").read_text() == "a real log\n"
  own = synthetic.write(TINY, tmp_path / "own")
  before = (own / "articles.csv").read_bytes()
  synthetic.write(TINY, own, overwrite=True)
  assert (own / "articles.csv").read_bytes() == before
  assert json.loads((own / synthetic.SYNTHETIC_FILE).read_text())["seed"] == TINY.seed


def _make_synthetic(*args):
  return subprocess.run([sys.executable, str(TOOLS / "make_synthetic.py"), "--preset=tiny",
                         *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_make_synthetic_interrupt_prob_flag(tmp_path):
  """--interrupt_prob reaches the generator: the written log is the one
  generate() makes with it; a value out of range is one line and writes nothing."""
  done = _make_synthetic(f"--output_dir={tmp_path / 'on'}", "--interrupt_prob=0.3")
  assert done.returncode == 0, done.stderr
  written = pd.read_csv(tmp_path / "on" / "train_click_log.csv")
  expected, _ = synthetic.generate(dataclasses.replace(TINY, interrupt_prob=0.3))
  np.testing.assert_array_equal(written["click_article_id"].to_numpy(),
                                expected["click_article_id"].to_numpy())
  off, _ = synthetic.generate(TINY)
  assert not np.array_equal(written["click_article_id"].to_numpy(),
                            off["click_article_id"].to_numpy())
  refused = _make_synthetic(f"--output_dir={tmp_path / 'bad'}", "--interrupt_prob=1.5")
  assert refused.returncode != 0
  assert refused.stderr.strip().splitlines()[-1].startswith(
      "make_synthetic: error: --interrupt_prob=1.5: must be in [0, 1)"), refused.stderr
  assert not (tmp_path / "bad").exists()
