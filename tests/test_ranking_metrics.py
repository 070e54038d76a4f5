import json
import math

import numpy as np
import pytest

from contracts import metrics as rm


def _pairwise_auc(labels, scores) -> float:
  """Brute-force AUC: share of (positive, negative) pairs ordered right, ties 1/2."""
  pos, neg = scores[labels == 1], scores[labels == 0]
  diff = pos[:, None] - neg[None, :]
  return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def _random_rows(seed, num_users=30, num_rows=400):
  """Interleaved users, coarse scores (many ties), ~10% positives."""
  rng = np.random.default_rng(seed)
  groups = rng.integers(0, num_users, num_rows) * 7 + 100  # sparse, non-contiguous ids
  labels = (rng.random(num_rows) < 0.1).astype(np.int64)
  scores = rng.integers(0, 6, num_rows) / 5.0
  return rng, groups, labels, scores


def test_auc_with_tie_by_hand():
  # Ascending: 0.1 (neg) rank 1, 0.3 (pos) rank 2, the 0.9 pair (pos, neg)
  # ranks 3, 4 -> both 3.5. Positive rank sum = 3.5 + 2 = 5.5; P = N = 2:
  # AUC = (5.5 - 2 * 3 / 2) / (2 * 2) = 2.5 / 4 = 0.625. Pairwise: tie 1/2,
  # 0.9 > 0.1, 0.3 < 0.9, 0.3 > 0.1 -> (0.5 + 1 + 0 + 1) / 4 = 0.625.
  assert rm.auc(np.array([1, 0, 1, 0]), np.array([0.9, 0.9, 0.3, 0.1])) == 0.625


def test_auc_nan_when_a_class_is_absent():
  assert math.isnan(rm.auc(np.array([1, 1]), np.array([0.2, 0.3])))
  assert math.isnan(rm.auc(np.array([0, 0]), np.array([0.2, 0.3])))
  assert math.isnan(rm.auc(np.zeros(0, np.int64), np.zeros(0)))


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_pairwise_count(seed):
  _, _, labels, scores = _random_rows(seed)
  assert np.isclose(rm.auc(labels, scores), _pairwise_auc(labels, scores))


def test_group_auc_by_hand_with_interleaved_users():
  # user 7 (rows 0, 2, 5): labels 1 0 0, scores .2 .5 .1: the positive beats
  #   .1, loses to .5 -> AUC 1/2, 3 rows.
  # user 3 (rows 1, 4, 7, 8): labels 0 1 1 0, scores .4 .4 .9 .95: pos .4 ties
  #   neg .4 (1/2), loses to .95 (0); pos .9 beats .4 (1), loses to .95 (0)
  #   -> AUC 1.5 / 4 = 0.375, 4 rows.
  # user 5 (rows 3, 6): negatives only -> excluded.
  # GAUC = (3 * 0.5 + 4 * 0.375) / 7 = 3 / 7 (the unweighted mean would be 0.4375).
  groups = np.array([7, 3, 7, 5, 3, 7, 5, 3, 3])
  labels = np.array([1, 0, 0, 0, 1, 0, 0, 1, 0])
  scores = np.array([.2, .4, .5, .3, .4, .1, .8, .9, .95])
  gauc, used = rm.group_auc(groups, labels, scores)
  assert np.isclose(gauc, 3 / 7)
  assert used == 2


def test_group_auc_ties_across_users_are_not_ties():
  # Both users have scores (1, 2) with the positive on 2 -> AUC 1 each. Were
  # the equal scores of the two users pooled, ranks would be shifted.
  gauc, used = rm.group_auc(np.array([0, 1, 0, 1]), np.array([0, 0, 1, 1]),
                            np.array([1., 1, 2, 2]))
  assert (gauc, used) == (1.0, 2)


def test_group_auc_nan_when_no_user_has_both_classes():
  gauc, used = rm.group_auc(np.array([0, 0, 1]), np.array([1, 1, 0]), np.array([.1, .2, .3]))
  assert math.isnan(gauc) and used == 0


@pytest.mark.parametrize("seed", range(5))
def test_group_auc_matches_per_user_pairwise_count(seed):
  _, groups, labels, scores = _random_rows(seed, num_users=20, num_rows=300)
  total, weight, used = 0.0, 0, 0
  for g in np.unique(groups):
    rows = groups == g
    if 0 < labels[rows].sum() < rows.sum():
      total += rows.sum() * _pairwise_auc(labels[rows], scores[rows])
      weight += rows.sum()
      used += 1
  gauc, got_used = rm.group_auc(groups, labels, scores)
  assert got_used == used
  assert np.isclose(gauc, total / weight)


def test_logloss_by_hand():
  # -ln .8 = 0.2231436, -ln(1 - .4) = 0.5108256, p = 1 clipped to 1 - 1e-7 ->
  # -ln(1 - 1e-7) = 1e-7, p = 0 clipped to 1e-7 -> -ln(1e-7) = 16.1180957.
  # Mean = 16.8520650 / 4 = 4.2130162.
  loss = rm.logloss(np.array([1, 0, 1, 1]), np.array([0.8, 0.4, 1.0, 0.0]))
  assert np.isclose(loss, 4.2130162)


def test_rank_within_groups_ties_by_tie_break_then_row():
  # user 2: rows 0 (.5, tb 3), 2 (.9, tb 1), 3 (.5, tb 2), 5 (.5, tb 3):
  #   row 2 first (best score), then the .5 ties by tie_break: row 3 (tb 2),
  #   then rows 0 and 5 (both tb 3) by row index -> ranks 2, 0, 1, 3.
  # user 1: rows 1 (.3, tb 2), 4 (.3, tb 1): tie -> row 4 first (rank 0).
  groups = np.array([2, 1, 2, 2, 1, 2])
  scores = np.array([.5, .3, .9, .5, .3, .5])
  tie_break = np.array([3, 2, 1, 2, 1, 3])
  ranks = rm.rank_within_groups(groups, scores, tie_break)
  assert ranks.tolist() == [2, 1, 0, 1, 0, 3]


@pytest.mark.parametrize("seed", range(3))
def test_rank_within_groups_matches_per_user_sort(seed):
  rng, groups, _, scores = _random_rows(seed)
  tie_break = rng.integers(0, 3, len(groups))
  ranks = rm.rank_within_groups(groups, scores, tie_break)
  for g in np.unique(groups):
    rows = np.flatnonzero(groups == g)
    ordered = sorted(rows, key=lambda r: (-scores[r], tie_break[r], r))
    assert ranks[ordered].tolist() == list(range(len(rows)))


def test_list_metrics_by_hand_with_a_user_without_positives():
  # Best positive rank (0-based): user 0 -> 2 (positives at 2 and 4), user 1
  # -> 0, user 2 -> none (a miss, still counted), user 3 -> 1. Four users.
  # HR@1 = 1/4; NDCG@1 = 1/4.
  # HR@2 = 2/4; NDCG@2 = (1 + 1/log2(3)) / 4 = (1 + 0.6309298) / 4 = 0.4077324.
  # HR@3 = 3/4; NDCG@3 adds 1/log2(4) = 0.5 -> 2.1309298 / 4 = 0.5327324.
  groups = np.array([0, 0, 0, 1, 1, 2, 2, 3, 3])
  labels = np.array([0, 1, 1, 0, 1, 0, 0, 1, 0])
  ranks = np.array([0, 2, 4, 1, 0, 0, 1, 1, 0])
  out = rm.list_metrics(groups, labels, ranks, ks=(1, 2, 3))
  assert out["num_users"] == 4
  assert out["num_users_with_positive"] == 3
  assert out["hit_rate@1"] == 0.25
  assert out["ndcg@1"] == 0.25
  assert out["hit_rate@2"] == 0.5
  assert np.isclose(out["ndcg@2"], 0.4077324)
  assert out["hit_rate@3"] == 0.75
  assert np.isclose(out["ndcg@3"], 0.5327324)


def test_list_metrics_rejects_negative_ranks():
  with pytest.raises(ValueError, match="0-based"):
    rm.list_metrics(np.array([0, 0]), np.array([1, 0]), np.array([-1, 0]), ks=(1,))


@pytest.mark.parametrize("seed", range(5))
def test_list_metrics_matches_per_user_loop(seed):
  rng, groups, labels, _ = _random_rows(seed)
  ranks = rng.integers(0, 14, len(groups))
  ks = (1, 3, 10)
  out = rm.list_metrics(groups, labels, ranks, ks)
  users = np.unique(groups)
  best = []
  for g in users:
    rows = (groups == g) & (labels == 1)
    best.append(ranks[rows].min() if rows.any() else None)
  assert out["num_users"] == len(users)
  assert out["num_users_with_positive"] == sum(b is not None for b in best)
  for k in ks:
    hits = [b is not None and b < k for b in best]
    gains = [1 / math.log2(b + 2) if hit else 0.0 for b, hit in zip(best, hits)]
    assert np.isclose(out[f"hit_rate@{k}"], sum(hits) / len(users))
    assert np.isclose(out[f"ndcg@{k}"], sum(gains) / len(users))


def test_summarize_scores_equal_to_minus_retrieval_rank_reproduce_retrieval():
  # Each user's retrieval_rank is a permutation of 0..n-1; scoring by its
  # negation reranks into the same order, so every reranked metric equals
  # its retrieval twin.
  rng, groups, labels, _ = _random_rows(0)
  retrieval_rank = np.empty(len(groups), np.int32)
  for g in np.unique(groups):
    rows = np.flatnonzero(groups == g)
    retrieval_rank[rows] = rng.permutation(len(rows))
  scores = -retrieval_rank.astype(np.float64)
  probabilities = rng.random(len(groups))
  ks = (1, 5, 10)
  out = rm.summarize_reranking(groups, labels, scores, probabilities, retrieval_rank, ks)
  for k in ks:
    assert out[f"hit_rate@{k}"] == out[f"retrieval_hit_rate@{k}"]
    assert out[f"ndcg@{k}"] == out[f"retrieval_ndcg@{k}"]
  assert out["auc"] == out["retrieval_auc"]
  assert np.isclose(out["gauc"], out["retrieval_gauc"])  # reached via 1 - GAUC(-score)
  assert out["examples"] == len(groups)
  assert out["positives"] == int(labels.sum())
  assert out["num_users"] == len(np.unique(groups))
  assert np.isclose(out["logloss"], rm.logloss(labels, probabilities))
  assert all(type(v) in (int, float) for v in out.values())
  json.dumps(out)


@pytest.mark.parametrize("seed", range(3))
def test_summarize_agrees_with_the_single_metric_functions(seed):
  # summarize shares one sort between the reranked lists and GAUC (GAUC of
  # -score, flipped); it must agree with the direct functions.
  rng, groups, labels, scores = _random_rows(seed)
  retrieval_rank = rng.integers(0, 19, len(groups))
  out = rm.summarize_reranking(groups, labels, scores, scores, retrieval_rank, ks=(1, 5))
  gauc, used = rm.group_auc(groups, labels, scores)
  assert np.isclose(out["gauc"], gauc) and out["gauc_users"] == used
  assert out["auc"] == rm.auc(labels, scores)
  reranked = rm.list_metrics(groups, labels,
                             rm.rank_within_groups(groups, scores, retrieval_rank), ks=(1, 5))
  for k in (1, 5):
    assert out[f"hit_rate@{k}"] == reranked[f"hit_rate@{k}"]
    assert out[f"ndcg@{k}"] == reranked[f"ndcg@{k}"]
  assert np.isclose(out["retrieval_gauc"], rm.group_auc(groups, labels, -retrieval_rank)[0])


def test_summarize_by_hand_reranking_helps():
  # Retrieval order: user 0 has its click at rank 1 (0-based), user 1 at rank 0.
  # The ranker puts user 0's click first and keeps user 1's (tie -> retrieval
  # order). Reranked HR@1 = 2/2, retrieval HR@1 = 1/2; retrieval NDCG@2 =
  # (1/log2(3) + 1) / 2 = 0.8154649. AUC: positives .8, .5 vs negatives .3,
  # .5 -> (1 + 1 + 1 + 0.5) / 4 = 0.875.
  groups = np.array([0, 0, 1, 1])
  labels = np.array([0, 1, 1, 0])
  scores = np.array([.3, .8, .5, .5])
  retrieval_rank = np.array([0, 1, 0, 1])
  out = rm.summarize_reranking(groups, labels, scores, scores, retrieval_rank, ks=(1, 2))
  assert out["hit_rate@1"] == 1.0
  assert out["retrieval_hit_rate@1"] == 0.5
  assert np.isclose(out["retrieval_ndcg@2"], 0.8154649)
  assert out["auc"] == 0.875
  assert out["num_users_with_positive"] == 2
