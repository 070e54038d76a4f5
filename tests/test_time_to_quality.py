"""tools/time_to_quality.py: the validation curve read back from TensorBoard summaries."""

import sys
from pathlib import Path

import pytest
import tensorflow as tf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import time_to_quality  # noqa: E402

from trainer import train_lib  # noqa: E402


def _write(directory: Path, tag: str, points: list[tuple[int, float]]) -> None:
  writer = tf.summary.create_file_writer(str(directory))
  with writer.as_default():
    for step, value in points:
      tf.summary.scalar(tag, value, step=step)
  writer.close()


def test_curve_steps_values_and_fractions(tmp_path):
  _write(tmp_path / train_lib.TRAIN_SUMMARIES, "loss", [(1, 9.0), (2, 8.0)])
  # The final evaluation repeats step 20 (the chosen one) with the same value:
  # the first event of a step is kept.
  _write(tmp_path / train_lib.EVAL_SUMMARIES, "ndcg@10",
         [(10, 0.02), (20, 0.05), (30, 0.04), (20, 0.05)])
  curve, reached = time_to_quality.minutes_to_quality(str(tmp_path), "ndcg@10")
  assert [(step, round(value, 6)) for _, step, value in curve] == [(10, 0.02), (20, 0.05),
                                                                   (30, 0.04)]
  minutes = [m for m, _, _ in curve]
  assert minutes == sorted(minutes) and minutes[0] >= 0
  # 90% of the best 0.05 is 0.045: first reached at step 20, as is 100%.
  assert reached[0.9] == reached[1.0] == minutes[1]


def test_best_within_budget_by_hand():
  curve = [(0.5, 10, 0.02), (1.5, 20, 0.05), (2.5, 30, 0.04)]
  assert time_to_quality.best_within(curve, 0.4) is None
  assert time_to_quality.best_within(curve, 1.0) == pytest.approx(0.02)
  assert time_to_quality.best_within(curve, 2.0) == pytest.approx(0.05)
  assert time_to_quality.best_within(curve, 9.0) == pytest.approx(0.05)


def test_missing_summaries_name_the_directory(tmp_path):
  with pytest.raises(SystemExit, match=str(tmp_path)):
    time_to_quality.minutes_to_quality(str(tmp_path), "ndcg@10")
