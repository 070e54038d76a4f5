"""Reads user_histories.parquet into queries (the contract's rule).

For an evaluation split, the query of a user with a held-out target is the
user's history up to that target: the training clicks, plus for the test
split the validation click (`--holdout=valid_test`). Those are also the
"seen" items removed before ranking. The query `ALL` (serving) is every
click the data has for the user, with no target.
"""

import dataclasses
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from contracts import manifest as mf
from contracts import sequences as sq

ALL = "all"


@dataclasses.dataclass
class Queries:
  """Users and their query histories (CSR); target 0 = none in this split."""
  user: np.ndarray  # int64 user index
  target: np.ndarray  # int64 item index
  values: np.ndarray  # int64 item indices of all query histories, concatenated
  offsets: np.ndarray  # int64 [n + 1]: row i is values[offsets[i]:offsets[i + 1]]

  def __len__(self) -> int:
    return len(self.user)

  def last_items(self, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded last `max_len` history items (n, max_len) and lengths."""
    return sq.pad_left_ragged(self.values, self.offsets[:-1], self.offsets[1:], max_len)

  def take(self, rows: np.ndarray) -> "Queries":
    values, offsets = sq.csr_take_rows(self.values, self.offsets, rows)
    return Queries(self.user[rows], self.target[rows], values, offsets)


_COLUMNS = ["user", "history", f"{mf.VALID}_item", f"{mf.TEST}_item"]


def _check_split(manifest: mf.Manifest, split: str, allow_all: bool) -> None:
  known = manifest.eval_splits + ((ALL,) if allow_all else ())
  if split not in known:
    raise ValueError(f"split {split!r} is not an evaluation split of holdout "
                     f"{manifest.holdout!r} ({', '.join(known)})")


def queries_from_table(table: pa.Table, split: str) -> Queries:
  """Every row's query for `split` (valid | test | ALL), in table order."""
  history = table.column("history").combine_chunks()
  # flatten() honours a slice's offset (.values would not).
  values = history.flatten().to_numpy().astype(np.int64)
  offsets = history.offsets.to_numpy().astype(np.int64)
  offsets = offsets - offsets[0]
  valid = table.column(f"{mf.VALID}_item").to_numpy().astype(np.int64)
  test = table.column(f"{mf.TEST}_item").to_numpy().astype(np.int64)
  appended = {mf.VALID: [], mf.TEST: [valid], ALL: [valid, test]}[split]
  for column in appended:
    # Users without that held-out click (item 0) get nothing appended.
    rows = np.flatnonzero(column > 0)
    values, offsets = sq.csr_append(values, offsets, column[rows], rows)
  target = {mf.VALID: valid, mf.TEST: test, ALL: np.zeros_like(valid)}[split]
  return Queries(user=table.column("user").to_numpy().astype(np.int64), target=target,
                 values=values, offsets=offsets)


def load_queries(manifest: mf.Manifest, split: str) -> Queries:
  """Users with a target in evaluation split `split`, and their queries."""
  _check_split(manifest, split, allow_all=False)
  table = pq.read_table(manifest.path(mf.USER_HISTORIES_FILE), columns=_COLUMNS)
  queries = queries_from_table(table, split)
  return queries.take(np.flatnonzero(queries.target > 0))


def num_users(manifest: mf.Manifest) -> int:
  return pq.ParquetFile(manifest.path(mf.USER_HISTORIES_FILE)).metadata.num_rows


def iter_query_batches(manifest: mf.Manifest, split: str, begin: int, end: int,
                       batch_size: int) -> Iterator[Queries]:
  """Queries of user rows [begin, end) in batches, reading only their row groups.

  Memory is one row group plus one batch, whatever the number of users.
  """
  _check_split(manifest, split, allow_all=True)
  path: Path = manifest.path(mf.USER_HISTORIES_FILE)
  parquet = pq.ParquetFile(path)
  group_rows = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
  group_start = np.concatenate([[0], np.cumsum(group_rows)])
  groups = [g for g in range(len(group_rows))
            if group_start[g] < end and group_start[g + 1] > begin]
  skip = begin - int(group_start[groups[0]]) if groups else 0
  pending: list[pa.RecordBatch] = []
  pending_rows, remaining = 0, end - begin
  for record_batch in parquet.iter_batches(batch_size=max(batch_size, 1024), row_groups=groups,
                                           columns=_COLUMNS):
    if skip:
      cut = min(skip, record_batch.num_rows)
      record_batch, skip = record_batch.slice(cut), skip - cut
    pending.append(record_batch)
    pending_rows += record_batch.num_rows
    while pending_rows >= min(batch_size, remaining) and remaining > 0:
      table = pa.Table.from_batches(pending)
      take = min(batch_size, remaining)
      yield queries_from_table(table.slice(0, take), split)
      rest = table.slice(take)
      pending, pending_rows, remaining = rest.to_batches(), rest.num_rows, remaining - take
    if remaining <= 0:
      return
