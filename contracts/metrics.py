"""Evaluation metrics shared by every job: one rank convention, one set of key names.

Ranks are 0-based everywhere in this module: rank 0 is the top of a list.
HitRate@K = mean(rank < K); NDCG@K = mean(1 / log2(rank + 2) if rank < K),
the ideal DCG being 1 with one target per user; with one target Recall@K
equals HitRate@K. `num_users` is always the denominator. Files keep their
own 1-based positions (a candidate part's `recall_rank`, a reranked list's
`rank`); callers convert at the boundary.

Leave-one-out retrieval (the notebooks' and the published full-ranking
protocol, ../shared/data/README.md):

* One held-out target per user; ranking is over every item of the
  vocabulary except padding (index 0).
* Items the query history contains (for the test split: the training clicks
  plus the validation click) are removed before ranking. A target the user
  had already clicked can then not be hit; that is counted, not hidden.
* Ties are broken by item index, lower first (= more popular, because
  preprocess orders items by training clicks), so results are deterministic.

Reranking a user's retrieval candidates (one row per (user, candidate);
`groups` is the user, `labels` 0/1, `scores` any float, NaN rejected):

* Each user has at most one relevant candidate; list metrics use the
  best-ranked positive of a user.
* Users whose candidates contain no positive (retrieval missed the click)
  stay in `num_users` and count as misses, so the numbers compare with the
  full-ranking ones and a reranker cannot look better by dropping them.
* AUC uses the rank-sum (Mann-Whitney) formula; tied scores share their
  average rank, i.e. a tied positive/negative pair counts 1/2.
* GAUC (DIN paper): per-user AUC weighted by the user's number of rows, over
  the users with at least one positive and one negative; others are
  excluded (their AUC is undefined) and the number used is reported.
* Reranked lists order a user's rows by score descending, ties by the
  retrieval rank, then by row index, so results are deterministic and a
  constant scorer reproduces the retrieval order.

Numpy only, vectorised over rows (a ranking split can hold ~20M rows).
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
  return summarize_sums(rank_sums(ranks, ks), ks)


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


# Reranking: rows of (user, candidate).


def _check(*arrays) -> list[np.ndarray]:
  """1-D arrays of one length; a mismatch would otherwise broadcast or misalign silently."""
  out = [np.asarray(a) for a in arrays]
  for a in out:
    if a.ndim != 1:
      raise ValueError(f"expected 1-D arrays, got shape {a.shape}")
  if len({len(a) for a in out}) > 1:
    raise ValueError(f"arrays differ in length: {[len(a) for a in out]}")
  return out


def _binary(labels: np.ndarray) -> np.ndarray:
  """Labels as int64 0/1 (int64 so segment sums cannot overflow a narrow dtype)."""
  if not ((labels == 0) | (labels == 1)).all():
    raise ValueError("labels must be 0 or 1")
  return labels.astype(np.int64)


def _scores(scores: np.ndarray) -> np.ndarray:
  """Scores as float64. NaN has no order (numpy sorts it last), so it is an error."""
  scores = scores.astype(np.float64)
  if np.isnan(scores).any():
    raise ValueError("scores contain NaN")
  return scores


def _starts(sorted_keys: np.ndarray) -> np.ndarray:
  """Indices where a run of equal values begins in a sorted array."""
  if not len(sorted_keys):
    return np.zeros(0, np.int64)
  return np.flatnonzero(np.concatenate([[True], sorted_keys[1:] != sorted_keys[:-1]]))


def _lengths(starts: np.ndarray, n: int) -> np.ndarray:
  return np.diff(np.append(starts, n))


def _sorted_group_auc(groups: np.ndarray, y: np.ndarray, keys: np.ndarray) -> tuple[float, int]:
  """GAUC of `keys` for rows already sorted by group, then by key ascending.

  Within a group, tied keys share the mean of the 1-based ranks they span.
  """
  n = len(keys)
  if not n:
    return float("nan"), 0
  starts = _starts(groups)
  new_run = np.zeros(n, bool)
  new_run[_starts(keys)] = True
  new_run[starts] = True  # equal keys of two users are not a tie
  run_starts = np.flatnonzero(new_run)
  run_ends = np.append(run_starts[1:], n)
  # Sorted positions start+1 .. end (1-based) have mean (start + end + 1) / 2;
  # subtracting the group's start makes it a rank within the group.
  ranks = np.repeat((run_starts + run_ends + 1) / 2.0, run_ends - run_starts)
  ranks -= np.repeat(starts, _lengths(starts, n))
  size = _lengths(starts, n).astype(np.float64)
  pos = np.add.reduceat(y, starts).astype(np.float64)
  neg = size - pos
  rank_sum = np.add.reduceat(ranks * y, starts)
  used = (pos > 0) & (neg > 0)
  if not used.any():
    return float("nan"), 0
  pos, neg, rank_sum, size = pos[used], neg[used], rank_sum[used], size[used]
  group_aucs = (rank_sum - pos * (pos + 1) / 2.0) / (pos * neg)
  return float(group_aucs @ size / size.sum()), int(used.sum())


def _rerank_order(groups: np.ndarray, scores: np.ndarray, tie_break: np.ndarray) -> np.ndarray:
  """Row order by group, score desc, tie_break asc, row index."""
  # lexsort: last key is primary; it is stable, so remaining ties keep row order.
  return np.lexsort((tie_break, -scores, groups))


def _ranks(sorted_groups: np.ndarray, order: np.ndarray) -> np.ndarray:
  """0-based rank within its group of each row (original order), given the sort order."""
  n = len(order)
  starts = _starts(sorted_groups)
  ranks = np.empty(n, np.int64)
  ranks[order] = np.arange(n) - np.repeat(starts, _lengths(starts, n))
  return ranks


def auc(labels, scores) -> float:
  """ROC AUC by rank sums, ties averaged; NaN when one class is absent."""
  labels, scores = _check(labels, scores)
  y, scores = _binary(labels), _scores(scores)
  pos = int(y.sum())
  neg = len(y) - pos
  if pos == 0 or neg == 0:
    return float("nan")
  # A score's average 1-based rank is the mean of its first and last positions
  # among the sorted scores; a value sort plus searchsorted is much cheaper
  # than an argsort of every row.
  ordered = np.sort(scores)
  positives = np.sort(scores[y == 1])  # sorted needles keep searchsorted cache-friendly
  first = np.searchsorted(ordered, positives, side="left") + 1
  last = np.searchsorted(ordered, positives, side="right")
  rank_sum = float((first + last).sum()) / 2.0
  return (rank_sum - pos * (pos + 1) / 2.0) / (float(pos) * neg)


def group_auc(groups, labels, scores) -> tuple[float, int]:
  """GAUC: per-group AUC weighted by group size over groups with both classes.

  Returns (gauc, number of groups used); (NaN, 0) when no group qualifies.
  """
  groups, labels, scores = _check(groups, labels, scores)
  y, scores = _binary(labels), _scores(scores)
  order = np.lexsort((scores, groups))
  return _sorted_group_auc(groups[order], y[order], scores[order])


def logloss(labels, probabilities, eps: float = 1e-7) -> float:
  """Mean binary cross-entropy; clipping keeps a confident mistake finite."""
  labels, probabilities = _check(labels, probabilities)
  y = _binary(labels)
  if not len(y):
    return float("nan")
  p = np.clip(probabilities.astype(np.float64), eps, 1.0 - eps)
  return float(-np.mean(np.where(y == 1, np.log(p), np.log1p(-p))))


def rank_within_groups(groups, scores, tie_break) -> np.ndarray:
  """0-based rank of each row in its group's list by score desc, tie_break asc, row index.

  With tie_break = the retrieval rank, equal scores keep the retrieval order.
  """
  groups, scores, tie_break = _check(groups, scores, tie_break)
  order = _rerank_order(groups, _scores(scores), tie_break)
  return _ranks(groups[order], order)


def list_metrics(groups, labels, ranks, ks) -> dict:
  """HitRate@K and NDCG@K of each group's best-ranked positive, over ALL groups.

  ranks are 0-based (rank_within_groups, or a candidate part's recall_rank - 1).
  Groups without a positive count as misses.
  """
  groups, labels, ranks = _check(groups, labels, ranks)
  y = _binary(labels).astype(bool)
  ranks = ranks.astype(np.float64)
  if not (ranks >= 0).all():  # also catches NaN
    raise ValueError("ranks must be 0-based (>= 0)")
  num_users = len(_starts(np.sort(groups)))  # np.sort is ~10x faster than np.unique here
  # Only positive rows matter (about one per user), so the per-user minimum is
  # taken over those: sorted by (group, rank), each group's first row.
  pos_groups, pos_ranks = groups[y], ranks[y]
  order = np.lexsort((pos_ranks, pos_groups))
  best = pos_ranks[order][_starts(pos_groups[order])]
  sums = rank_sums(best, ks)
  sums["num_users"] = num_users  # users without a positive: in the denominator only
  out = summarize_sums(sums, ks)
  out["num_users_with_positive"] = len(best)
  return out


def summarize_reranking(groups, labels, scores, probabilities, retrieval_ranks, ks) -> dict:
  """All ranker metrics, next to the same metrics of the retrieval order, as plain numbers.

  retrieval_ranks are the 0-based candidate ranks from retrieval; they break
  score ties in the reranked lists and are scored as -retrieval_ranks for the
  retrieval AUC/GAUC. AUC/GAUC may be NaN (json writes it as NaN).
  """
  groups, labels, scores, probabilities, retrieval_ranks = _check(
      groups, labels, scores, probabilities, retrieval_ranks)
  y, scores = _binary(labels), _scores(scores)
  # One (group, -score) sort serves both the reranked lists and GAUC: it is
  # the GAUC sort of -score, and per user AUC(score) = 1 - AUC(-score) (ties
  # count 1/2 either way), so the size-weighted mean flips the same way.
  order = _rerank_order(groups, scores, retrieval_ranks)
  sorted_groups = groups[order]
  flipped_gauc, gauc_users = _sorted_group_auc(sorted_groups, y[order], -scores[order])
  out = {"auc": auc(labels, scores), "gauc": 1.0 - flipped_gauc, "gauc_users": gauc_users,
         "logloss": logloss(labels, probabilities)}
  reranked = list_metrics(groups, labels, _ranks(sorted_groups, order), ks)
  retrieval = list_metrics(groups, labels, retrieval_ranks, ks)
  for k in ks:
    for name in (f"hit_rate@{k}", f"ndcg@{k}"):
      out[name] = reranked[name]
      out[f"retrieval_{name}"] = retrieval[name]
  retrieval_scores = -retrieval_ranks.astype(np.float64)
  out["retrieval_auc"] = auc(labels, retrieval_scores)
  out["retrieval_gauc"] = group_auc(groups, labels, retrieval_scores)[0]
  out["num_users"] = reranked["num_users"]
  out["num_users_with_positive"] = reranked["num_users_with_positive"]
  out["examples"] = int(len(labels))
  out["positives"] = int(y.sum())
  return out
