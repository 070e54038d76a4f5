"""Offline metrics of a ranker that re-orders each user's retrieval candidates.

Numpy only (no TensorFlow), so an evaluation job or a notebook can score a
predictions file without starting TF. Every function is vectorised over
rows (sorts and segment reductions), because a split can hold ~20M rows.

Inputs are 1-D arrays of equal length, one entry per (user, candidate) row:
`groups` (user index; a user's rows need not be contiguous), `labels` (0/1)
and `scores` (any float, higher = better; NaN is rejected, not ranked).

Evaluation assumptions:

* One held-out click per user, so each user has at most one relevant item
  among its candidates. List metrics use the best-positioned positive of a
  user (the same thing when there is exactly one).
* Users whose candidates contain no positive (retrieval missed the click)
  stay in the denominators of HitRate@K and NDCG@K and count as misses, so
  the numbers are comparable with the full-ranking ones of
  retrieval/metrics.py and a reranker cannot look better by dropping them.
* Positions are 1-based. NDCG@K = mean over users of 1 / log2(1 + p) if the
  positive's position p <= K, else 0 (the ideal DCG is 1 with one target).
* AUC uses the rank-sum (Mann-Whitney) formula; tied scores share their
  average rank, i.e. a tied positive/negative pair counts 1/2.
* GAUC (DIN paper): per-user AUC weighted by the user's number of rows, over
  the users with at least one positive and one negative; others are
  excluded (their AUC is undefined) and the number used is reported.
* Reranked lists order a user's rows by score descending, ties by the
  retrieval rank, then by row index, so results are deterministic and a
  constant scorer reproduces the retrieval order.
"""

import numpy as np


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


def _positions(sorted_groups: np.ndarray, order: np.ndarray) -> np.ndarray:
  """1-based position within its group of each row (original order), given the sort order."""
  n = len(order)
  starts = _starts(sorted_groups)
  positions = np.empty(n, np.int64)
  positions[order] = np.arange(1, n + 1) - np.repeat(starts, _lengths(starts, n))
  return positions


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
  """1-based position of each row in its group's list by score desc, tie_break asc, row index.

  With tie_break = the retrieval rank, equal scores keep the retrieval order.
  """
  groups, scores, tie_break = _check(groups, scores, tie_break)
  order = _rerank_order(groups, _scores(scores), tie_break)
  return _positions(groups[order], order)


def list_metrics(groups, labels, positions, ks) -> dict:
  """HitRate@K and NDCG@K of each group's best-positioned positive, over ALL groups.

  positions are 1-based (rank_within_groups, or retrieval's recall_rank).
  Groups without a positive count as misses.
  """
  groups, labels, positions = _check(groups, labels, positions)
  y = _binary(labels).astype(bool)
  positions = positions.astype(np.float64)
  if not (positions >= 1).all():  # also catches NaN and 0-based ranks (log2(1) = 0)
    raise ValueError("positions must be 1-based")
  num_users = len(_starts(np.sort(groups)))  # np.sort is ~10x faster than np.unique here
  # Only positive rows matter (about one per user), so the per-user minimum is
  # taken over those: sorted by (group, position), each group's first row.
  pos_groups, pos_positions = groups[y], positions[y]
  order = np.lexsort((pos_positions, pos_groups))
  best = pos_positions[order][_starts(pos_groups[order])]
  out = {"users": num_users, "users_with_positive": len(best)}
  for k in ks:
    hit = best <= k
    # Users without a positive add 0 to the sums but count in the denominator.
    out[f"hit_rate@{k}"] = float(hit.sum() / num_users) if num_users else 0.0
    out[f"ndcg@{k}"] = float((1.0 / np.log2(1.0 + best[hit])).sum() / num_users) \
        if num_users else 0.0
  return out


def summarize(groups, labels, scores, probabilities, retrieval_rank, ks) -> dict:
  """All ranker metrics, next to the same metrics of the retrieval order, as plain numbers.

  retrieval_rank is the 1-based candidate position from retrieval; it breaks
  score ties in the reranked lists and is scored as -retrieval_rank for the
  retrieval AUC/GAUC. AUC/GAUC may be NaN (json writes it as NaN).
  """
  groups, labels, scores, probabilities, retrieval_rank = _check(
      groups, labels, scores, probabilities, retrieval_rank)
  y, scores = _binary(labels), _scores(scores)
  # One (group, -score) sort serves both the reranked lists and GAUC: it is
  # the GAUC sort of -score, and per user AUC(score) = 1 - AUC(-score) (ties
  # count 1/2 either way), so the size-weighted mean flips the same way.
  order = _rerank_order(groups, scores, retrieval_rank)
  sorted_groups = groups[order]
  flipped_gauc, gauc_users = _sorted_group_auc(sorted_groups, y[order], -scores[order])
  out = {"auc": auc(labels, scores), "gauc": 1.0 - flipped_gauc, "gauc_users": gauc_users,
         "logloss": logloss(labels, probabilities)}
  reranked = list_metrics(groups, labels, _positions(sorted_groups, order), ks)
  retrieval = list_metrics(groups, labels, retrieval_rank, ks)
  for k in ks:
    for name in (f"hit_rate@{k}", f"ndcg@{k}"):
      out[name] = reranked[name]
      out[f"retrieval_{name}"] = retrieval[name]
  retrieval_scores = -retrieval_rank.astype(np.float64)
  out["retrieval_auc"] = auc(labels, retrieval_scores)
  out["retrieval_gauc"] = group_auc(groups, labels, retrieval_scores)[0]
  out["users"] = reranked["users"]
  out["users_with_positive"] = reranked["users_with_positive"]
  out["examples"] = int(len(labels))
  out["positives"] = int(y.sum())
  return out
