import numpy as np

from contracts import metrics


def test_target_ranks_with_seen_items_removed_and_ties_by_index():
  # Items 0..5 (0 = padding). Row 0: scores 5 4 4 3 2 1, seen {1}: item 1 is
  # removed, so items 2 (4.0), 3 (3.0) lead; target 4 (2.0) has rank 2.
  # Row 1: all scores equal, target 3, nothing seen: items 1, 2 are ahead by
  # index -> rank 2. Row 2: target 2 was seen -> removed -> rank 6 (a miss).
  scores = np.array([[5., 4, 4, 3, 2, 1], [1., 1, 1, 1, 1, 1], [0., 1, 2, 3, 4, 5]])
  metrics.remove_seen(scores, np.array([1, 2]), np.array([0, 1, 1, 2]))
  ranks = metrics.target_ranks(scores, np.array([4, 3, 2]))
  assert ranks.tolist() == [2, 2, 6]


def test_ranks_in_lists():
  ranked = np.array([[7, 3, 9], [1, 2, 4]])
  assert metrics.ranks_in_lists(ranked, np.array([9, 5])).tolist() == [2, 3]


def test_summarize_by_hand():
  # ranks 0, 1, 4, 30: HR@2 = 2/4; NDCG@2 = (1/log2(2) + 1/log2(3)) / 4
  #   = (1 + 0.6309298) / 4 = 0.4077324; HR@10 = 3/4, NDCG@10 adds 1/log2(6) = 0.3868528.
  out = metrics.summarize(np.array([0, 1, 4, 30]), ks=(2, 10))
  assert out["hit_rate@2"] == 0.5
  assert np.isclose(out["ndcg@2"], 0.4077324)
  assert out["hit_rate@10"] == 0.75
  assert np.isclose(out["ndcg@10"], (1 + 0.6309298 + 0.3868528) / 4)
  assert out["recall@10"] == out["hit_rate@10"]
  assert out["num_users"] == 4
