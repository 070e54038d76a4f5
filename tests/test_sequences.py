"""Sequence building on hand-written logs, expected values written out."""

import numpy as np
import pytest

from contracts import sequences as sq


def seqs_of(*users):
  """Sequences from per-user item lists (times are positions)."""
  items = np.concatenate([np.asarray(u, dtype=np.int32) for u in users])
  offsets = np.concatenate([[0], np.cumsum([len(u) for u in users])]).astype(np.int64)
  return sq.Sequences(items, np.arange(len(items), dtype=np.int64), offsets)


def examples(seqs, targets, max_len):
  users = seqs.user_of(targets)
  hist, length = sq.pad_left_ragged(seqs.items, seqs.starts[users - 1], targets, max_len)
  return users.tolist(), hist.tolist(), length.tolist(), seqs.items[targets].tolist()


def test_pad_left_ragged_pads_on_the_left_and_keeps_the_most_recent():
  values = np.array([1, 2, 3, 4, 5, 6, 7])
  hist, length = sq.pad_left_ragged(values, np.array([0, 2, 3, 7]), np.array([2, 7, 3, 7]), 3)
  assert hist.tolist() == [[0, 1, 2], [5, 6, 7], [0, 0, 0], [0, 0, 0]]
  assert length.tolist() == [2, 3, 0, 0]


def test_holdout_last_on_a_hand_written_log():
  # user 1 clicks 11 12 13 14; user 2 clicks 21 22; user 3 clicks only 31.
  seqs = seqs_of([11, 12, 13, 14], [21, 22], [31])
  holdout = sq.split_holdout(seqs, "last")
  assert holdout.train_end.tolist() == [3, 5, 7]  # user 3 keeps its only click for training
  assert holdout.targets["valid"].tolist() == [3, 5, -1]
  assert holdout.train_mask(seqs).tolist() == [1, 1, 1, 0, 1, 0, 1]

  valid = holdout.targets["valid"][holdout.targets["valid"] >= 0]
  assert examples(seqs, valid, 2) == ([1, 2], [[12, 13], [0, 21]], [2, 1], [14, 22])

  train = sq.train_targets(seqs, holdout, "positions", 2)
  # user 1: targets 12, 13 (history 11 / 11 12); user 2: history 21 has no next
  # click left after the holdout; user 3: a single click has no target.
  assert examples(seqs, train, 2) == ([1, 1], [[0, 11], [11, 12]], [1, 2], [12, 13])


def test_holdout_valid_test_history_includes_the_validation_click():
  seqs = seqs_of([11, 12, 13, 14, 15], [21, 22])
  holdout = sq.split_holdout(seqs, "valid_test")
  assert holdout.targets["valid"].tolist() == [3, -1]  # user 2 is too short: train only
  assert holdout.targets["test"].tolist() == [4, -1]
  assert examples(seqs, np.array([3]), 3) == ([1], [[11, 12, 13]], [3], [14])
  assert examples(seqs, np.array([4]), 3) == ([1], [[12, 13, 14]], [3], [15])
  train = sq.train_targets(seqs, holdout, "positions", 3)
  assert examples(seqs, train, 3) == ([1, 1, 2], [[0, 0, 11], [0, 11, 12], [0, 0, 21]],
                                      [1, 2, 1], [12, 13, 22])


def test_positions_cap_keeps_the_most_recent_targets():
  seqs = seqs_of([1, 2, 3, 4, 5, 6])
  holdout = sq.split_holdout(seqs, "last")  # train 1..5, valid 6
  train = sq.train_targets(seqs, holdout, "positions", 2, max_samples_per_user=2)
  assert seqs.items[train].tolist() == [4, 5]


def test_windows_cover_every_training_click_after_the_first_exactly_once():
  # 1 user, train clicks 1..8 (valid = 9), windows of 3: targets 8, 5, 2 with
  # histories [5 6 7], [2 3 4], [0 0 1]; per-position targets 6 7 8 | 3 4 5 | 2.
  seqs = seqs_of([1, 2, 3, 4, 5, 6, 7, 8, 9])
  holdout = sq.split_holdout(seqs, "last")
  train = sq.train_targets(seqs, holdout, "windows", 3)
  assert examples(seqs, train, 3) == ([1, 1, 1], [[0, 0, 1], [2, 3, 4], [5, 6, 7]],
                                      [1, 3, 3], [2, 5, 8])
  mask = sq.per_position_target_mask(seqs, train, "windows", 3)
  assert seqs.items[mask].tolist() == [2, 3, 4, 5, 6, 7, 8]


@pytest.mark.parametrize("max_len", [1, 2, 5, 50])
def test_windows_property_on_random_users(max_len):
  rng = np.random.default_rng(max_len)
  users = [rng.integers(1, 100, size=n) for n in rng.integers(1, 40, size=30)]
  seqs = seqs_of(*users)
  holdout = sq.split_holdout(seqs, "valid_test")
  train = sq.train_targets(seqs, holdout, "windows", max_len)
  mask = sq.per_position_target_mask(seqs, train, "windows", max_len)
  expected = holdout.train_mask(seqs).copy()
  expected[seqs.starts] = False  # a user's first click is never predicted
  np.testing.assert_array_equal(mask, expected)
  # Windows of one user never overlap in what they predict.
  first = sq.history_starts(seqs, train, max_len) + 1
  covered = np.zeros(len(seqs.items), int)
  for a, b in zip(first, train):
    covered[a:b + 1] += 1
  assert covered.max() == 1


def test_csr_helpers():
  values, offsets = np.array([1, 2, 3, 4, 5]), np.array([0, 2, 2, 5])
  v, o = sq.csr_append(values, offsets, np.array([9, 8, 7]))
  assert (v.tolist(), o.tolist()) == ([1, 2, 9, 8, 3, 4, 5, 7], [0, 3, 4, 8])
  # Rows [1, 2, 3, 4, 5] split [0, 2) [2, 2) [2, 5); append 8 to row 1 only.
  v, o = sq.csr_append(values, offsets, np.array([8]), rows=np.array([1]))
  assert (v.tolist(), o.tolist()) == ([1, 2, 8, 3, 4, 5], [0, 2, 3, 6])
  v, o = sq.csr_take_rows(values, offsets, np.array([2, 0]))
  assert (v.tolist(), o.tolist()) == ([3, 4, 5, 1, 2], [0, 3, 5])
