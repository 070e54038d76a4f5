"""Raw id <-> index vocabularies (replaces the notebooks' `IdMap`).

Index 0 is padding/unknown; raw ids take indices 1..n in the order given.
Lookups are vectorised through one pandas hash index built at construction,
not per call.
"""

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from contracts.errors import DataError


class Vocabulary:
  """Maps raw ids to dense indices 1..n (0 = padding/unknown).

  Raw ids are int64 or strings, in the type the source had (preprocess
  reads an id column as integers only when every value is a canonical
  integer). FAISS labels are int64: the raw ids themselves for integer ids,
  the indices for string ids (`faiss_labels`, `index_of_labels`).
  """

  def __init__(self, raw_ids: np.ndarray, name: str = "ids"):
    raw_ids = np.asarray(raw_ids)
    if raw_ids.dtype.kind in "iu":
      raw_ids = raw_ids.astype(np.int64)
    elif raw_ids.dtype.kind in "OUS" or raw_ids.size == 0:
      raw_ids = raw_ids.astype(object) if raw_ids.size else np.zeros(0, np.int64)
    else:
      raise ValueError(f"{name} vocabulary: raw ids must be integers or strings, not "
                       f"{raw_ids.dtype}")
    self.name = name
    self._raw_ids = raw_ids
    self._index = pd.Index(raw_ids)
    if not self._index.is_unique:
      dup = self._index[self._index.duplicated()][0]
      shown = repr(dup) if isinstance(dup, str) else str(dup)
      raise ValueError(f"{name} vocabulary: raw id {shown} appears twice")

  @property
  def is_string(self) -> bool:
    return self._raw_ids.dtype == object

  @property
  def arrow_type(self) -> pa.DataType:
    """The type of the raw ids in every output that names them."""
    return pa.string() if self.is_string else pa.int64()

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
    arr = np.asarray(raw_ids, dtype=object if self.is_string else np.int64)
    positions = self._index.get_indexer(arr.reshape(-1))
    return (positions + 1).astype(np.int32).reshape(arr.shape)  # -1 (unknown) -> 0

  def to_raw(self, indices) -> np.ndarray:
    """Indices (any shape, 1..n) -> raw ids. Padding has no raw id."""
    idx = np.asarray(indices, dtype=np.int64)
    if idx.size and (idx.min() < 1 or idx.max() >= self.size):
      bad = idx[(idx < 1) | (idx >= self.size)].reshape(-1)[0]
      raise ValueError(f"{self.name} vocabulary: index {bad} has no raw id (size {self.size})")
    return self._raw_ids[idx - 1]

  def to_arrow(self, indices) -> pa.Array:
    """Indices -> the raw ids as an Arrow array of `arrow_type`."""
    return pa.array(self.to_raw(indices), self.arrow_type)

  def faiss_labels(self) -> np.ndarray:
    """int64 label of index 1..n in a FAISS index: the raw id, or the index for strings."""
    if self.is_string:
      return np.arange(1, self.size, dtype=np.int64)
    return self._raw_ids

  def index_of_labels(self, labels) -> np.ndarray:
    """FAISS labels (any shape, -1 = none) -> int32 indices (0 = none)."""
    labels = np.asarray(labels, dtype=np.int64)
    if self.is_string:
      return np.where((labels >= 1) & (labels < self.size), labels, 0).astype(np.int32)
    return self.lookup(labels)

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
    raw = table.column(id_column).slice(1).to_numpy(zero_copy_only=False)
    return cls(raw, name=f"{path.name}:{id_column}")
