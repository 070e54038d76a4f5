"""Leave-one-out ranking metrics, shared by every job that evaluates.

Evaluation assumptions (those of the notebooks and of the published
full-ranking results in ../shared/data/README.md):

* One held-out target per user; ranking is over every item of the
  vocabulary except padding (index 0).
* Items the query history contains (for the test split: the training clicks
  plus the validation click) are removed before ranking. A target the user
  had already clicked can then not be hit; that is counted, not hidden.
* Ties are broken by item index, lower first (= more popular, because
  preprocess orders items by training clicks), so results are deterministic.
* rank is 0-based. HitRate@K = mean(rank < K). With one target per user
  Recall@K equals HitRate@K. NDCG@K = mean(1 / log2(rank + 2) if rank < K).
"""

import numpy as np


def remove_seen(scores: np.ndarray, seen_values: np.ndarray, seen_offsets: np.ndarray) -> None:
  """Sets scores[i, item] = -inf for every item in row i's seen list (CSR), in place.

  Padding (index 0) is always removed.
  """
  rows = np.repeat(np.arange(len(scores)), np.diff(seen_offsets))
  scores[rows, seen_values] = -np.inf
  scores[:, 0] = -np.inf


def target_ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """0-based rank of each row's target among all items, ties by lower index.

  scores: (n, num_items) with removed items at -inf. A removed target gets
  rank num_items (never a hit).
  """
  n, num_items = scores.shape
  target_scores = scores[np.arange(n), targets][:, None]
  ahead = (scores > target_scores).sum(axis=1)
  tied_lower = ((scores == target_scores) & (np.arange(num_items)[None, :] < targets[:, None]))
  ranks = ahead + tied_lower.sum(axis=1)
  return np.where(np.isneginf(target_scores[:, 0]), num_items, ranks)


def ranks_in_lists(ranked: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """0-based position of each target in its ranked candidate list (n, K); K if absent."""
  hits = ranked == targets[:, None]
  return np.where(hits.any(axis=1), hits.argmax(axis=1), ranked.shape[1])


RANK_METRICS = ("hit_rate", "ndcg", "recall")  # each written as NAME@K by summarize


def metric_names(ks) -> list[str]:
  """The metric keys `summarize` writes for cut-offs `ks` (all: higher is better)."""
  return [f"{name}@{k}" for k in ks for name in RANK_METRICS]


def summarize(ranks: np.ndarray, ks=(10, 20, 50)) -> dict[str, float]:
  """HitRate@K, NDCG@K and Recall@K from 0-based target ranks."""
  ranks = np.asarray(ranks)
  out = {"num_users": int(len(ranks))}
  for k in ks:
    hit = ranks < k
    out[f"hit_rate@{k}"] = float(hit.mean()) if len(ranks) else 0.0
    out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean()) \
        if len(ranks) else 0.0
    out[f"recall@{k}"] = out[f"hit_rate@{k}"]
  return out


def rank_sums(ranks: np.ndarray, ks) -> dict[str, float]:
  """Additive form of `summarize` (counts and sums), to merge parts and workers."""
  ranks = np.asarray(ranks)
  out = {"num_users": int(len(ranks))}
  for k in ks:
    hit = ranks < k
    out[f"hits@{k}"] = int(hit.sum())
    out[f"ndcg_sum@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).sum())
  return out


def merge_sums(parts) -> dict[str, float]:
  total: dict[str, float] = {}
  for part in parts:
    for key, value in part.items():
      total[key] = total.get(key, 0) + value
  return total


def summarize_sums(sums: dict, ks) -> dict[str, float]:
  """`summarize` from merged `rank_sums`."""
  n = sums.get("num_users", 0)
  out = {"num_users": int(n)}
  for k in ks:
    out[f"hit_rate@{k}"] = sums.get(f"hits@{k}", 0) / n if n else 0.0
    out[f"ndcg@{k}"] = sums.get(f"ndcg_sum@{k}", 0.0) / n if n else 0.0
    out[f"recall@{k}"] = out[f"hit_rate@{k}"]
  return out
