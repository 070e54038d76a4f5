"""Raw id <-> index vocabularies (replaces the notebooks' `IdMap`).

Index 0 is padding/unknown; raw ids take indices 1..n in the order given.
Lookups are vectorised through one pandas hash index built at construction,
not per call.
"""

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from preprocess.errors import DataError


class Vocabulary:
  """Maps integer raw ids to dense indices 1..n (0 = padding/unknown)."""

  def __init__(self, raw_ids: np.ndarray, name: str = "ids"):
    raw_ids = np.asarray(raw_ids, dtype=np.int64)
    self.name = name
    self._raw_ids = raw_ids
    self._index = pd.Index(raw_ids)
    if not self._index.is_unique:
      dup = self._index[self._index.duplicated()][0]
      raise ValueError(f"{name} vocabulary: raw id {dup} appears twice")

  @property
  def size(self) -> int:
    """Embedding table size: number of ids plus the padding row."""
    return len(self._raw_ids) + 1

  @property
  def raw_ids(self) -> np.ndarray:
    """Raw ids in index order; raw_ids[i - 1] is the id of index i."""
    return self._raw_ids

  def lookup(self, raw_ids) -> np.ndarray:
    """Raw ids (any shape) -> int32 indices; unknown ids -> 0."""
    arr = np.asarray(raw_ids, dtype=np.int64)
    positions = self._index.get_indexer(arr.reshape(-1))
    return (positions + 1).astype(np.int32).reshape(arr.shape)  # -1 (unknown) -> 0

  def to_raw(self, indices) -> np.ndarray:
    """Indices (any shape, 1..n) -> int64 raw ids. Padding has no raw id."""
    idx = np.asarray(indices, dtype=np.int64)
    if idx.size and (idx.min() < 1 or idx.max() >= self.size):
      bad = idx[(idx < 1) | (idx >= self.size)].reshape(-1)[0]
      raise ValueError(f"{self.name} vocabulary: index {bad} has no raw id (size {self.size})")
    return self._raw_ids[idx - 1]

  @classmethod
  def from_parquet(cls, path: Path | str, id_column: str) -> "Vocabulary":
    """Loads a vocabulary table written by preprocess (row i = index i)."""
    path = Path(path)
    try:
      table = pq.read_table(path, columns=["index", id_column])
    except (OSError, KeyError, ValueError) as e:
      raise DataError(f"{path}: cannot read vocabulary column {id_column!r} ({e})") from e
    index = table.column("index").to_numpy()
    if len(index) == 0 or not np.array_equal(index, np.arange(len(index))):
      raise DataError(f"{path}: 'index' column is not 0..n-1")
    raw = table.column(id_column).slice(1).to_numpy()
    return cls(raw, name=f"{path.name}:{id_column}")
