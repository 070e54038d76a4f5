"""Reads user_histories.parquet into evaluation queries (the contract's rule).

For an evaluation split, the query of a user with a held-out target is the
user's history up to that target: the training clicks, plus for the test
split the validation click (`--holdout=valid_test`). Those are also the
"seen" items removed before ranking.
"""

import dataclasses

import numpy as np
import pyarrow.parquet as pq

from preprocess import manifest as mf
from preprocess import sequences as sq


@dataclasses.dataclass
class Queries:
  """Users with a target in one split and their query histories (CSR)."""
  user: np.ndarray  # int64 user index
  target: np.ndarray  # int64 item index
  values: np.ndarray  # int64 item indices of all query histories, concatenated
  offsets: np.ndarray  # int64 [n + 1]: row i is values[offsets[i]:offsets[i + 1]]

  def __len__(self) -> int:
    return len(self.user)

  def last_items(self, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded last `max_len` history items (n, max_len) and lengths."""
    return sq.pad_left_ragged(self.values, self.offsets[:-1], self.offsets[1:], max_len)


def load_queries(manifest: mf.Manifest, split: str) -> Queries:
  if split not in manifest.eval_splits:
    raise ValueError(f"split {split!r} is not an evaluation split of holdout "
                     f"{manifest.holdout!r} ({', '.join(manifest.eval_splits)})")
  columns = sorted({"user", "history", f"{split}_item", f"{mf.VALID}_item"})
  table = pq.read_table(manifest.path(mf.USER_HISTORIES_FILE), columns=columns)
  history = table.column("history").combine_chunks()
  values = history.values.to_numpy().astype(np.int64)
  offsets = history.offsets.to_numpy().astype(np.int64)
  if split == mf.TEST:
    values, offsets = sq.csr_append(
        values, offsets, table.column(f"{mf.VALID}_item").to_numpy().astype(np.int64))
  target = table.column(f"{split}_item").to_numpy().astype(np.int64)
  rows = np.flatnonzero(target > 0)
  values, offsets = sq.csr_take_rows(values, offsets, rows)
  return Queries(user=table.column("user").to_numpy().astype(np.int64)[rows],
                 target=target[rows], values=values, offsets=offsets)
