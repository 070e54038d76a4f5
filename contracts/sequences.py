"""User click sequences, holdout splits and example sampling, vectorised.

Clicks are kept in one flat array sorted by (user, time, source row) with
per-user offsets (CSR layout). Every example, whether for training or
evaluation, is then just the flat index of its target click: its history
is the up-to-`max_seq_len` clicks of the same user right before it. This
replaces the notebooks' per-user Python loops, `pad_left` and last-click
split.
"""

import dataclasses

import numpy as np

from contracts import manifest as mf


@dataclasses.dataclass
class Sequences:
  """All clicks grouped by user, in time order.

  User index u (1-based, 0 is padding) owns flat positions
  offsets[u - 1]:offsets[u].
  """
  items: np.ndarray  # int32 item index of each click
  ts: np.ndarray  # int64 time of each click
  offsets: np.ndarray  # int64 [num_users + 1]

  @property
  def num_users(self) -> int:
    return len(self.offsets) - 1

  @property
  def starts(self) -> np.ndarray:
    return self.offsets[:-1]

  @property
  def lengths(self) -> np.ndarray:
    return np.diff(self.offsets)

  def user_of(self, flat_index: np.ndarray) -> np.ndarray:
    """User index (1-based) owning each flat click position."""
    return np.searchsorted(self.offsets, flat_index, side="right").astype(np.int64)


@dataclasses.dataclass
class Holdout:
  """Where each user's training clicks end and which clicks are held out."""
  train_end: np.ndarray  # int64 per user: exclusive end of the training clicks
  targets: dict[str, np.ndarray]  # eval split -> flat index per user, -1 if none

  def train_mask(self, seqs: Sequences) -> np.ndarray:
    """Boolean per flat click: True when the click is training data."""
    n = len(seqs.items)
    diff = np.zeros(n + 1, dtype=np.int64)
    np.add.at(diff, seqs.starts, 1)
    np.add.at(diff, self.train_end, -1)
    return np.cumsum(diff[:-1]) > 0


def split_holdout(seqs: Sequences, protocol: str) -> Holdout:
  """Leave-last-out splits.

  last:       the last click is the validation target (the notebooks).
  valid_test: second-to-last is validation, last is test; the test history
              therefore includes the validation click (the SASRec protocol).
  A user needs at least one history click before each held-out click, so
  users with fewer than 2 (last) or 3 (valid_test) clicks hold nothing out:
  all their clicks are training data, as in the SASRec reference code.
  """
  if protocol not in mf.HOLDOUT_SPLITS:
    raise ValueError(f"unknown holdout {protocol!r}; choose from {sorted(mf.HOLDOUT_SPLITS)}")
  splits = mf.HOLDOUT_SPLITS[protocol]
  held = len(splits)
  ends = seqs.offsets[1:]
  eligible = seqs.lengths >= held + 1
  train_end = np.where(eligible, ends - held, ends)
  targets = {}
  for k, split in enumerate(splits):
    targets[split] = np.where(eligible, train_end + k, -1)
  return Holdout(train_end=train_end, targets=targets)


def _ragged_steps(ends: np.ndarray, counts: np.ndarray, step: int) -> np.ndarray:
  """For each row r: ends[r] - step * j for j = counts[r]-1 .. 0 (ascending values)."""
  total = int(counts.sum())
  row = np.repeat(np.arange(len(counts)), counts)
  first = np.cumsum(counts) - counts
  j_from_last = counts[row] - 1 - (np.arange(total) - first[row])
  return ends[row] - step * j_from_last


def train_targets(seqs: Sequences, holdout: Holdout, samples: str, max_seq_len: int,
                  max_samples_per_user: int = 0) -> np.ndarray:
  """Flat indices of training targets (sorted), one per training example.

  positions: every training click after a user's first is a target.
  windows:   targets every `max_seq_len` clicks counted back from the last
             training click; the example's history then covers the previous
             window, so with a loss on every position each training click
             after the user's first is predicted exactly once.
  max_samples_per_user > 0 keeps only that many most recent examples per user.
  """
  if samples not in mf.SAMPLES:
    raise ValueError(f"unknown samples {samples!r}; choose from {mf.SAMPLES}")
  num_targets = np.maximum(holdout.train_end - seqs.starts - 1, 0)
  if samples == "positions":
    counts, step = num_targets, 1
  else:
    counts, step = -(-num_targets // max_seq_len), max_seq_len  # ceil
  if max_samples_per_user > 0:
    counts = np.minimum(counts, max_samples_per_user)
  return _ragged_steps(holdout.train_end - 1, counts, step)


def history_starts(seqs: Sequences, targets: np.ndarray, max_seq_len: int) -> np.ndarray:
  """First flat index of each target's history window."""
  return np.maximum(seqs.starts[seqs.user_of(targets) - 1], targets - max_seq_len)


def pad_left_ragged(values: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                    max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """The last `max_len` of values[starts[i]:ends[i]] per row, left-padded with 0.

  Returns (matrix int32 [n, max_len], lengths int32 [n]): longer rows keep
  their most recent items; shorter rows have zeros on the left.
  """
  starts = np.asarray(starts, dtype=np.int64)
  ends = np.asarray(ends, dtype=np.int64)
  positions = ends[:, None] + np.arange(-max_len, 0, dtype=np.int64)[None, :]
  real = positions >= np.maximum(starts, ends - max_len)[:, None]
  matrix = np.where(real, values[np.clip(positions, 0, max(len(values) - 1, 0))], 0)
  return matrix.astype(np.int32), real.sum(axis=1).astype(np.int32)


def per_position_target_mask(seqs: Sequences, targets: np.ndarray, samples: str,
                             max_seq_len: int) -> np.ndarray:
  """Boolean per flat click: is it predicted by some training example?

  positions: the example targets. windows: every click of a window after its
  first history item, plus the target (what a loss on every position sees).
  Used for item target frequencies (logQ correction).
  """
  n = len(seqs.items)
  if samples == "positions":
    mask = np.zeros(n, dtype=bool)
    mask[targets] = True
    return mask
  first = history_starts(seqs, targets, max_seq_len) + 1
  diff = np.zeros(n + 1, dtype=np.int64)
  np.add.at(diff, first, 1)
  np.add.at(diff, targets + 1, -1)
  return np.cumsum(diff[:-1]) > 0


def csr_take_rows(values: np.ndarray, offsets: np.ndarray,
                  rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Rows `rows` of a CSR ragged array, as a new (values, offsets)."""
  starts, lengths = offsets[:-1][rows], np.diff(offsets)[rows]
  new_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  take = np.repeat(starts - new_offsets[:-1], lengths) + np.arange(new_offsets[-1])
  return values[take], new_offsets


def csr_append(values: np.ndarray, offsets: np.ndarray, column: np.ndarray,
               rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Appends column[j] to the end of row rows[j] (default: every row, in order)
  of a CSR ragged array; `rows` sorted and unique."""
  n = len(offsets) - 1
  rows = np.arange(n) if rows is None else np.asarray(rows)
  shift = np.zeros(n + 1, np.int64)  # items appended to the rows before row i
  shift[rows + 1] = 1
  shift = np.cumsum(shift)
  new_offsets = offsets + shift
  out = np.empty(len(values) + len(rows), dtype=np.result_type(values, column))
  out[np.arange(len(values)) + np.repeat(shift[:-1], np.diff(offsets))] = values
  out[new_offsets[rows + 1] - 1] = column
  return out, new_offsets
