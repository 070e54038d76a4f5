"""Non-learned baselines on a preprocess output: most-popular and first-order Markov.

  python tools/baselines.py --data_dir=OUT [--split=valid|test]

most_popular: items by training clicks. markov: counts of "next click after
the query's last click" in the training histories, ties by popularity. Both
are ranked over all items with seen items removed (contracts/metrics.py
states the protocol). On a log with sequential structure markov beats
most_popular by a wide margin; a trained sequence model should beat both.
"""

import json

import numpy as np
import pyarrow.parquet as pq
from absl import app, flags

from contracts import manifest as mf
from contracts import histories
from contracts import metrics

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "preprocess output directory.")
flags.DEFINE_string("split", "", "Evaluation split (default: the last one of the holdout).")
flags.DEFINE_list("ks", ["10", "20", "50"], "Cut-offs.")
flags.mark_flag_as_required("data_dir")


def transition_counts(manifest: mf.Manifest, num_items: int):
  """CSR (ptr, cols, counts) of next-click counts in the training histories."""
  history = pq.read_table(manifest.path(mf.USER_HISTORIES_FILE),
                          columns=["history"]).column("history").combine_chunks()
  offsets = history.offsets.to_numpy()
  values = history.values.to_numpy().astype(np.int64)
  consecutive = np.ones(len(values), bool)
  consecutive[offsets[:-1][np.diff(offsets) > 0]] = False  # first click of a user has no prev
  nxt = np.flatnonzero(consecutive)
  pair = values[nxt - 1] * num_items + values[nxt]
  keys, counts = np.unique(pair, return_counts=True)
  rows, cols = keys // num_items, keys % num_items
  ptr = np.searchsorted(rows, np.arange(num_items + 1))
  return ptr, cols, counts


def evaluate(manifest: mf.Manifest, split: str, ks) -> dict[str, dict[str, float]]:
  items = pq.read_table(manifest.path(mf.ITEMS_FILE), columns=["train_clicks"])
  popularity = items.column("train_clicks").to_numpy().astype(np.float64)
  num_items = len(popularity)
  queries = histories.load_queries(manifest, split)
  seen_values, seen_offsets, targets = queries.values, queries.offsets, queries.target
  last_item = queries.last_items(1)[0][:, 0].astype(np.int64)
  ptr, cols, counts = transition_counts(manifest, num_items)
  tie_break = popularity / (popularity.max() + 1.0)  # < 1: only orders equal counts
  batch = max(1, (1 << 24) // num_items)
  ranks = {"most_popular": [], "markov": []}
  for begin in range(0, len(targets), batch):
    end = min(begin + batch, len(targets))
    seen = seen_values[seen_offsets[begin]:seen_offsets[end]]
    seen_off = seen_offsets[begin:end + 1] - seen_offsets[begin]
    pop = np.tile(popularity, (end - begin, 1))
    metrics.remove_seen(pop, seen, seen_off)
    ranks["most_popular"].append(metrics.target_ranks(pop, targets[begin:end]))
    markov = np.tile(tie_break, (end - begin, 1))
    row_ptr_start, row_ptr_end = ptr[last_item[begin:end]], ptr[last_item[begin:end] + 1]
    n_per_row = row_ptr_end - row_ptr_start
    which = np.repeat(np.arange(end - begin), n_per_row)
    pos = np.repeat(row_ptr_start - np.cumsum(n_per_row) + n_per_row, n_per_row) + np.arange(
        n_per_row.sum())
    markov[which, cols[pos]] += counts[pos]
    metrics.remove_seen(markov, seen, seen_off)
    ranks["markov"].append(metrics.target_ranks(markov, targets[begin:end]))
  return {name: metrics.summarize(np.concatenate(r), ks) for name, r in ranks.items()}


def main(argv):
  del argv
  manifest = mf.load(FLAGS.data_dir)
  split = FLAGS.split or manifest.eval_splits[-1]
  results = evaluate(manifest, split, tuple(int(k) for k in FLAGS.ks))
  print(json.dumps({"data_dir": str(manifest.data_dir), "split": split, **results}, indent=1))


if __name__ == "__main__":
  app.run(main)
