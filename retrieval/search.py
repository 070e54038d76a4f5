"""Top-K search with each user's seen items removed, vectorised.

The notebooks searched `topk + max_seq_len + 10` deep and dropped seen items
in a Python loop: a user with a longer history than that got fewer than
`topk` candidates. Here a user whose first search (at most 2 topk deep)
leaves fewer than `topk` unseen items is searched again `topk + len(seen)`
deep, which for an exact index always leaves `topk` (when the catalogue has
them); users are grouped by depth rounded up to a power of two so a batch
costs a few FAISS calls. Seen items are removed with one sorted-key
membership test over the whole batch; the survivors of each row keep their
order (a stable argsort). ANN indexes can return fewer than `depth` results
(a probed IVF list runs dry); rows left short are searched again with IVF
scanning every list, and whatever is still missing is counted.

`search_unseen_dense` is the exact search the job uses for Flat up to
DENSE_MAX_ITEMS items: every item scored by one BLAS product, seen items set
to -inf first, so depth never matters.
"""

import dataclasses

import faiss
import numpy as np

from contracts.vocab import Vocabulary
from retrieval import index as index_lib


@dataclasses.dataclass
class SearchResult:
  items: np.ndarray  # (n, topk) int64 item indices, 0 where a row has fewer results
  scores: np.ndarray  # (n, topk) float32 inner products, -inf where missing
  counts: np.ndarray  # (n,) int64 results per row
  researched_rows: int = 0  # rows searched again exhaustively


def search_unseen(index: faiss.Index, items_vocab: Vocabulary, queries: np.ndarray,
                  seen_values: np.ndarray, seen_offsets: np.ndarray, topk: int,
                  exclude_seen: bool = True) -> SearchResult:
  """Top-`topk` items per query row, excluding row i's seen items (CSR) if asked.

  The index's labels are `items_vocab.faiss_labels()`; `items_vocab` maps them to indices.
  """
  n = len(queries)
  queries = np.ascontiguousarray(queries, dtype=np.float32)
  seen_counts = np.diff(seen_offsets) if exclude_seen else np.zeros(n, np.int64)
  # Depth that always suffices for an exact index: topk + seen count, rounded
  # up to a power of two so rows share a few FAISS calls. Most seen items
  # are not among a user's best topk + topk, and a deep heap is the costly
  # part of a search, so the first pass stops at 2 topk; rows it leaves
  # short get the full depth.
  def pow2(x):
    return np.where(x > 0, 2 ** np.ceil(np.log2(np.maximum(x, 1))), 0).astype(np.int64)

  full_depth = np.minimum(topk + pow2(seen_counts), index.ntotal)
  first_depth = np.minimum(full_depth, topk + pow2(np.minimum(seen_counts, topk)))
  items = np.zeros((n, topk), np.int64)
  scores = np.full((n, topk), -np.inf, np.float32)
  counts = np.zeros(n, np.int64)
  seen_keys = row_keys(np.repeat(np.arange(n), np.diff(seen_offsets)), seen_values) \
      if exclude_seen else np.zeros(0, np.int64)
  seen_keys = np.unique(seen_keys)

  def run(rows: np.ndarray, k: int) -> None:
    distances, labels = index.search(queries[rows], int(k))
    # FAISS marks "no result" with label -1.
    found = np.where(labels == -1, 0, items_vocab.index_of_labels(labels)).astype(np.int64)
    drop = found == 0
    if exclude_seen:
      keys = row_keys(np.repeat(rows, found.shape[1]), found.reshape(-1))
      drop |= isin_sorted(keys, seen_keys).reshape(found.shape)
    keep = np.argsort(drop, axis=1, kind="stable")[:, :topk]
    width = keep.shape[1]
    items[rows, :width] = np.take_along_axis(np.where(drop, 0, found), keep, axis=1)
    scores[rows, :width] = np.take_along_axis(
        np.where(drop, -np.inf, distances).astype(np.float32), keep, axis=1)
    counts[rows] = np.minimum((~drop).sum(axis=1), topk)

  def run_grouped(rows: np.ndarray, depth: np.ndarray) -> None:
    for k in np.unique(depth[rows]):
      run(rows[depth[rows] == k], k)

  # One FAISS call for the whole first pass: Flat search runs 4.9x more
  # queries/s at 4,096 queries per call than at 1,024 (364k items, 2 cores).
  if n:
    run(np.arange(n), first_depth.max())
  deeper = np.flatnonzero((counts < topk) & (first_depth < full_depth))
  run_grouped(deeper, full_depth)
  # A row is short if fewer than topk survived although the catalogue has
  # more unseen items than it got (exact search never leaves such rows).
  available = index.ntotal - (_unique_counts(seen_values, seen_offsets) if exclude_seen else 0)
  short = np.flatnonzero(counts < np.minimum(topk, available))
  if len(short):
    with index_lib.scanning_every_list(index):
      run_grouped(short, full_depth)
  return SearchResult(items, scores, counts, researched_rows=len(short))


# Up to this many items an exact search is a BLAS product + argpartition:
# FAISS Flat's cost there is its heap, not the product (BUILD_NOTES).
DENSE_MAX_ITEMS = 65536


def search_unseen_dense(item_vectors: np.ndarray, queries: np.ndarray, seen_values: np.ndarray,
                        seen_offsets: np.ndarray, topk: int, exclude_seen: bool = True,
                        rows_per_product: int = 1024) -> SearchResult:
  """Exact top-`topk` by scoring every item; item_vectors row i - 1 is item index i.

  Seen items get -inf before selection, so no depth is ever too shallow.
  """
  n, num_items = len(queries), len(item_vectors)
  items = np.zeros((n, topk), np.int64)
  scores = np.full((n, topk), -np.inf, np.float32)
  counts = np.zeros(n, np.int64)
  for begin in range(0, n, rows_per_product):
    end = min(begin + rows_per_product, n)
    block = queries[begin:end] @ item_vectors.T
    if exclude_seen:
      lo, hi = seen_offsets[begin], seen_offsets[end]
      rows = np.repeat(np.arange(end - begin), np.diff(seen_offsets[begin:end + 1]))
      block[rows, seen_values[lo:hi] - 1] = -np.inf
    top = np.argpartition(-block, topk - 1, axis=1)[:, :topk] if topk < num_items else \
        np.broadcast_to(np.arange(num_items), (end - begin, num_items))
    top_scores = np.take_along_axis(block, top, axis=1)
    # Best first; equal scores by item index, as the metrics break ties.
    order = np.lexsort((top, -top_scores), axis=1)
    top, top_scores = np.take_along_axis(top, order, 1), np.take_along_axis(top_scores, order, 1)
    found = np.isfinite(top_scores)
    width = top.shape[1]
    items[begin:end, :width] = np.where(found, top + 1, 0)
    scores[begin:end, :width] = np.where(found, top_scores, -np.inf)
    counts[begin:end] = found.sum(axis=1)
  return SearchResult(items, scores, counts)


def row_keys(rows: np.ndarray, items: np.ndarray) -> np.ndarray:
  # One int64 per (row, item): rows < 2^31, item indices < 2^32.
  return (rows.astype(np.int64) << 32) | items.astype(np.int64)


def isin_sorted(keys: np.ndarray, sorted_unique: np.ndarray) -> np.ndarray:
  if not len(sorted_unique):
    return np.zeros(keys.shape, bool)
  pos = np.minimum(np.searchsorted(sorted_unique, keys), len(sorted_unique) - 1)
  return sorted_unique[pos] == keys


def _unique_counts(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
  """Distinct items per CSR row."""
  rows = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
  distinct = np.unique(row_keys(rows, values)) >> 32
  return np.bincount(distinct, minlength=len(offsets) - 1)
