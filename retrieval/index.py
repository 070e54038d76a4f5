"""FAISS indexes over the item tower: build, save atomically, load with search params.

Every index is inner product over L2-normalised vectors (cosine), wrapped in
`IndexIDMap2` whose labels are the items' raw ids, so a user who loads the
file with `faiss.read_index` gets raw ids back. Search parameters (nprobe,
efSearch) are not trusted from the file: `set_search_params` sets them after
every load.

Types: `flat` (exact), `ivf` (IVF-Flat), `ivf_pq` (IVF with product-quantised
residuals), `hnsw` (HNSW-Flat). IVF k-means wants about 39 training points
per list (FAISS warns below that and centroids become noise), so the list
count is capped at num_items // 39, with a warning when a requested value is
lowered; `auto_nlist` picks ~4 sqrt(N) under that cap.
"""

import contextlib
import dataclasses
import json
import math
from pathlib import Path
from typing import Iterator

import faiss
import numpy as np
from absl import logging

from contracts.errors import DataError
from contracts.fileio import write_bytes_atomic, write_json_atomic

INDEX_TYPES = ("flat", "ivf", "ivf_pq", "hnsw")
MIN_POINTS_PER_LIST = 39
MAX_PQ_NBITS = 16
INDEX_FILE = "items.faiss"
INDEX_INFO_FILE = "index_info.json"


@dataclasses.dataclass(frozen=True)
class IndexSpec:
  """What is built (stored with the index); search params are set at load."""
  kind: str = "flat"
  nlist: int = 0  # ivf*: number of lists (0: auto)
  pq_m: int = 8  # ivf_pq: sub-quantisers (must divide dim)
  pq_nbits: int = 8  # ivf_pq: bits per code (lowered for small catalogues)
  hnsw_m: int = 32  # hnsw: graph degree
  ef_construction: int = 128  # hnsw
  seed: int = 1234  # k-means seed: same vectors + spec -> same index

  def resolved(self, num_vectors: int, dim: int) -> "IndexSpec":
    """Fills nlist / pq_nbits for the data; raises ValueError on impossible specs."""
    if self.kind not in INDEX_TYPES:
      raise ValueError(f"unknown index type {self.kind!r} (expected one of {INDEX_TYPES})")
    spec = self
    if self.kind in ("ivf", "ivf_pq"):
      if self.nlist > num_vectors:
        raise ValueError(f"--nlist={self.nlist} is larger than the item count ({num_vectors})")
      cap = max(1, num_vectors // MIN_POINTS_PER_LIST)
      nlist = self.nlist or auto_nlist(num_vectors)
      if nlist > cap:
        logging.warning("nlist %d leaves fewer than %d items per list for k-means on %d "
                        "items; using nlist=%d", nlist, MIN_POINTS_PER_LIST, num_vectors, cap)
        nlist = cap
      spec = dataclasses.replace(spec, nlist=nlist)
    if self.kind == "hnsw" and self.hnsw_m < 2:  # FAISS aborts (0) or crashes (1)
      raise ValueError(f"--hnsw_m={self.hnsw_m}: HNSW needs 2 or more neighbours per node")
    if self.kind == "ivf_pq":
      if self.pq_m < 1 or dim % self.pq_m:
        raise ValueError(f"--pq_m={self.pq_m} must divide the embedding size {dim}")
      if not 1 <= self.pq_nbits <= MAX_PQ_NBITS:
        raise ValueError(f"ivf_pq: {self.pq_nbits}-bit codes, FAISS takes 1 to {MAX_PQ_NBITS}")
      # Each sub-quantiser is a k-means with 2^nbits centroids over the items.
      nbits = min(self.pq_nbits, int(math.log2(max(2, num_vectors // MIN_POINTS_PER_LIST))))
      if nbits < 1:
        raise ValueError(f"ivf_pq needs at least {2 * MIN_POINTS_PER_LIST} items")
      if nbits < self.pq_nbits:
        logging.warning("ivf_pq: %d items are too few for %d-bit codes; using %d bits",
                        num_vectors, self.pq_nbits, nbits)
      spec = dataclasses.replace(spec, pq_nbits=nbits)
    return spec


def auto_nlist(num_vectors: int) -> int:
  """~4 sqrt(N) lists (the FAISS guideline's lower end), at least 39 points each."""
  return int(max(1, min(4 * math.sqrt(num_vectors), num_vectors // MIN_POINTS_PER_LIST)))


def build(vectors: np.ndarray, ids: np.ndarray,
          spec: IndexSpec) -> tuple[faiss.Index, IndexSpec]:
  """Index over float32 (n, d) `vectors` (normalised here) labelled `ids`; the resolved spec."""
  vectors = np.ascontiguousarray(vectors, dtype=np.float32).copy()
  faiss.normalize_L2(vectors)
  n, dim = vectors.shape
  spec = spec.resolved(n, dim)
  ip = faiss.METRIC_INNER_PRODUCT
  if spec.kind == "flat":
    inner = faiss.IndexFlatIP(dim)
  elif spec.kind == "hnsw":
    inner = faiss.IndexHNSWFlat(dim, spec.hnsw_m, ip)
    inner.hnsw.efConstruction = spec.ef_construction
  else:
    quantizer = faiss.IndexFlatIP(dim)
    if spec.kind == "ivf":
      inner = faiss.IndexIVFFlat(quantizer, dim, spec.nlist, ip)
    else:
      inner = faiss.IndexIVFPQ(quantizer, dim, spec.nlist, spec.pq_m, spec.pq_nbits, ip)
    inner.cp.seed = spec.seed
    inner.cp.min_points_per_centroid = 1  # the cap above already keeps >= 39
    inner.train(vectors)
  # The Python wrappers keep `quantizer` and `inner` alive with `index`.
  index = faiss.IndexIDMap2(inner)
  index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))
  return index, spec


def auto_nprobe(nlist: int, num_items: int, topk: int) -> int:
  """Lists to scan so that about max(N / 16, 100 topk) items are scored.

  A top-100 over a few thousand items needs most lists for good recall
  (ML-1M, 95 lists: nprobe 5 gave ANN recall@100 0.65), so small catalogues
  end up scanning everything, large ones a sixteenth.
  """
  per_list = num_items / max(nlist, 1)
  wanted = max(num_items / 16, 100 * topk)
  return int(min(nlist, max(1, math.ceil(wanted / per_list))))


def set_search_params(index: faiss.Index, nprobe: int = 0, ef_search: int = 0,
                      topk: int = 100) -> dict:
  """Sets nprobe (IVF) / efSearch (HNSW) on a loaded index; returns what was set.

  nprobe 0: `auto_nprobe` for `topk`. ef_search 0: max(128, 2 topk).
  """
  params = {}
  ivf = _ivf(index)
  if ivf is not None:
    if nprobe > ivf.nlist:
      raise ValueError(f"--nprobe={nprobe} is larger than the index's nlist ({ivf.nlist})")
    ivf.nprobe = nprobe or auto_nprobe(ivf.nlist, index.ntotal, topk)
    params["nprobe"] = int(ivf.nprobe)
    params["nlist"] = int(ivf.nlist)
  inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
  if isinstance(inner, faiss.IndexHNSW):
    inner.hnsw.efSearch = ef_search or max(128, 2 * topk)
    params["ef_search"] = int(inner.hnsw.efSearch)
  return params


def _ivf(index: faiss.Index):
  """The IVF part of `index` (through IndexIDMap2), or None for flat / hnsw."""
  try:
    return faiss.extract_index_ivf(index)
  except RuntimeError:
    return None


@contextlib.contextmanager
def scanning_every_list(index: faiss.Index) -> Iterator[None]:
  """Inside: an IVF index probes every list (for rows an ANN search left short)."""
  ivf = _ivf(index)
  if ivf is None:
    yield
    return
  nprobe = ivf.nprobe
  ivf.nprobe = ivf.nlist
  try:
    yield
  finally:
    ivf.nprobe = nprobe


def save(index: faiss.Index, directory: Path, info: dict) -> Path:
  """Writes INDEX_FILE and INDEX_INFO_FILE into `directory`, each atomically."""
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  write_bytes_atomic(directory / INDEX_FILE, faiss.serialize_index(index).tobytes())
  write_json_atomic(directory / INDEX_INFO_FILE, info)
  return directory / INDEX_FILE


def load(directory: Path) -> tuple[faiss.Index, dict]:
  directory = Path(directory)
  info_path = directory / INDEX_INFO_FILE
  try:
    info = json.loads(info_path.read_text())
    index = faiss.read_index(str(directory / INDEX_FILE))
  except (OSError, ValueError, RuntimeError) as e:
    raise DataError(f"{directory}: cannot load the index ({e})") from e
  return index, info
