"""Deterministic synthetic click logs in the notebooks' news schema.

The log has the structure real logs have and a sequence model can learn,
so "beats most-popular" is a meaningful check on it:

* Zipf item popularity, items grouped in Zipf-sized categories.
* Each user has a few favourite categories (Dirichlet weights) that drift:
  now and then a favourite is replaced by another category.
* Short-range sequential dependence: with `follow_prob` the next click is
  one of a few fixed "successors" of the previous click (mostly in the same
  category, the first successor most likely); otherwise the user stays in
  the current category or switches to a favourite (`switch_prob`), and picks
  an item there by popularity.
* Interruptions (`interrupt_prob`, off unless a preset sets it): a click is
  one of `trending_items` trending articles (a pool outside every thread,
  drawn by popularity) that leaves the user's thread as it was, so the
  next click continues from the click before the interruption. A
  first-order Markov chain sees the interruption as the last click and
  predicts from it; a sequence model can look past it.

Generation is vectorised over users: one numpy step per click position,
with users ordered by length so the active users are always a prefix.
Same config (seed included) -> byte-identical files.
"""

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from contracts.fileio import atomic_directory, locked_output, output_errors, write_json_atomic
from preprocess.readers import NEWS_ARTICLES, NEWS_CLICKS

# Written beside the two CSVs: it marks the directory as this generator's, so
# --overwrite never replaces a real news log that has the same file names.
SYNTHETIC_FILE = "synthetic.json"


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  num_users: int
  num_items: int
  num_categories: int
  mean_clicks_per_user: float
  min_clicks_per_user: int = 2
  item_zipf: float = 1.0
  category_zipf: float = 0.8
  follow_prob: float = 0.45  # next click is a successor of the last click
  switch_prob: float = 0.15  # move to a (favourite) category
  explore_prob: float = 0.2  # a switch goes to a non-favourite category
  drift_prob: float = 0.01  # per click: one favourite is replaced
  interrupt_prob: float = 0.0  # a click is a trending item outside the thread
  trending_items: int = 40  # the pool of interruptions (when interrupt_prob > 0)
  num_successors: int = 3
  same_category_successors: float = 0.8
  favourite_categories: int = 3
  seed: int = 0
  start_ms: int = 1_506_816_000_000  # 2017-10-01, like the news data
  days: int = 16

  def validate(self) -> None:
    for name in ("num_users", "num_items", "num_categories", "num_successors",
                 "favourite_categories"):
      if getattr(self, name) < 1:
        raise ValueError(f"--{name}={getattr(self, name)}: must be >= 1")
    if self.min_clicks_per_user < 1 or self.mean_clicks_per_user < self.min_clicks_per_user:
      raise ValueError("need 1 <= --min_clicks_per_user <= --mean_clicks_per_user")
    if self.follow_prob + self.switch_prob > 1:
      raise ValueError("--follow_prob + --switch_prob must be <= 1")
    if not 0 <= self.interrupt_prob < 1:
      raise ValueError(f"--interrupt_prob={self.interrupt_prob}: must be in [0, 1)")
    if self.interrupt_prob > 0 and not 1 <= self.trending_items <= (
        self.num_items - self.num_categories):
      raise ValueError(f"--trending_items={self.trending_items}: must be in [1, num_items - "
                       f"num_categories] ({self.num_items - self.num_categories})")


PRESETS = {
    # unit tests: a second or less end to end
    "tiny": SyntheticConfig(num_users=300, num_items=400, num_categories=8,
                            mean_clicks_per_user=12),
    # make demo: the whole pipeline in a few minutes on 2 CPU cores. The
    # interruptions are what a sequence model gains over the first-order
    # Markov chain (without them the chain is as good as sasrec here).
    "demo": SyntheticConfig(num_users=6000, num_items=4000, num_categories=40,
                            mean_clicks_per_user=24, interrupt_prob=0.3),
    # the notebooks' real scale (train_click_log.csv: 200k users, 364k
    # articles, 1.1M clicks), for benchmarks
    "news": SyntheticConfig(num_users=200_000, num_items=364_047, num_categories=461,
                            mean_clicks_per_user=5.56),
}


class _CategorySampler:
  """Draws items by popularity, within a category or globally, vectorised."""

  def __init__(self, category: np.ndarray, weight: np.ndarray):
    self.by_category = np.argsort(category, kind="stable")
    cat_sorted = category[self.by_category]
    w = weight[self.by_category]
    totals = np.bincount(cat_sorted, weights=w)
    cdf = np.cumsum(w) - np.repeat(np.cumsum(totals) - totals, np.bincount(cat_sorted))
    cdf /= totals[cat_sorted]
    last = np.append(cat_sorted[1:] != cat_sorted[:-1], True)
    cdf[last] = 1.0
    # Keys of category c lie in (c, c + 1]; c + u with u in [0, 1) lands in c.
    self.keys = cat_sorted + cdf
    self.global_cdf = np.cumsum(weight) / weight.sum()
    self.global_cdf[-1] = 1.0

  def in_category(self, category: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    pos = np.searchsorted(self.keys, category + rng.random(len(category)), side="right")
    return self.by_category[np.minimum(pos, len(self.keys) - 1)]

  def anywhere(self, n: int, rng: np.random.Generator) -> np.ndarray:
    return np.minimum(np.searchsorted(self.global_cdf, rng.random(n), side="right"),
                      len(self.global_cdf) - 1)


def generate(config: SyntheticConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
  """Returns (train_click_log, articles) frames in the notebooks' schema.

  With interruptions, `log.attrs["trending_article_ids"]` lists the pool's
  article ids (sorted), so an analysis can tell interruptions apart.
  """
  config.validate()
  rng = np.random.default_rng(config.seed)
  n_items, n_cats, n_users = config.num_items, config.num_categories, config.num_users

  cat_weight = 1.0 / np.arange(1, n_cats + 1) ** config.category_zipf
  item_cat = rng.choice(n_cats, size=n_items, p=cat_weight / cat_weight.sum())
  item_cat[:min(n_cats, n_items)] = np.arange(min(n_cats, n_items))  # no empty category
  item_weight = 1.0 / rng.permutation(np.arange(1, n_items + 1)) ** config.item_zipf
  if config.interrupt_prob > 0:  # no draw otherwise: presets without it stay byte-identical
    # Trending articles are only ever interruptions: weight 0 in the threads.
    # The first n_cats items keep every category non-empty, so they stay out.
    trending = n_cats + rng.choice(n_items - n_cats, config.trending_items, replace=False)
    trending_cdf = np.cumsum(item_weight[trending]) / item_weight[trending].sum()
    trending_cdf[-1] = 1.0
    item_weight = item_weight.copy()
    item_weight[trending] = 0.0
  sampler = _CategorySampler(item_cat, item_weight)
  used_cats = np.unique(item_cat)
  used_cat_p = cat_weight[used_cats] / cat_weight[used_cats].sum()

  k = config.num_successors
  successors = np.where(
      rng.random((n_items, k)) < config.same_category_successors,
      sampler.in_category(np.repeat(item_cat, k), rng).reshape(n_items, k),
      sampler.anywhere(n_items * k, rng).reshape(n_items, k))
  successor_p = 1.0 / np.arange(1, k + 1)
  successor_cdf = np.cumsum(successor_p) / successor_p.sum()

  extra_mean = config.mean_clicks_per_user - config.min_clicks_per_user
  sigma = 1.0
  extra = rng.lognormal(np.log(max(extra_mean, 1e-9)) - sigma**2 / 2, sigma, n_users)
  lengths = config.min_clicks_per_user + np.minimum(
      np.round(extra), 20 * config.mean_clicks_per_user).astype(np.int64)
  # Users longest first, so the users still clicking at step t (length > t)
  # are a prefix of active_at[t] users.
  order = np.argsort(-lengths, kind="stable")
  lengths_sorted = lengths[order]
  offsets = np.concatenate([[0], np.cumsum(lengths_sorted)])
  active_at = np.searchsorted(-lengths_sorted, -np.arange(lengths_sorted[0]), side="left")

  f = config.favourite_categories
  favourites = rng.choice(used_cats, size=(n_users, f), p=used_cat_p)
  fav_cdf = np.cumsum(rng.dirichlet(np.ones(f), size=n_users), axis=1)
  fav_cdf[:, -1] = 1.0

  def pick_favourite(users: np.ndarray) -> np.ndarray:
    slot = (rng.random(len(users))[:, None] > fav_cdf[users]).sum(axis=1)
    return favourites[users, slot]

  clicks = np.empty(offsets[-1], dtype=np.int64)
  current_cat = pick_favourite(np.arange(n_users))
  last_item = sampler.in_category(current_cat, rng)
  clicks[offsets[:-1]] = last_item
  for t in range(1, len(active_at)):
    n = active_at[t]
    users = np.arange(n)
    drift = np.flatnonzero(rng.random(n) < config.drift_prob)
    favourites[drift, rng.integers(0, f, len(drift))] = rng.choice(
        used_cats, size=len(drift), p=used_cat_p)
    r = rng.random(n)
    follow = r < config.follow_prob
    switch = ~follow & (r < config.follow_prob + config.switch_prob)
    cat = current_cat[:n].copy()
    explore = switch & (rng.random(n) < config.explore_prob)
    cat[switch] = pick_favourite(users[switch])
    cat[explore] = rng.choice(used_cats, size=int(explore.sum()), p=used_cat_p)
    item = sampler.in_category(cat, rng)
    slot = np.searchsorted(successor_cdf, rng.random(n), side="right")
    item[follow] = successors[last_item[:n][follow], slot[follow]]
    thread = np.ones(n, bool)
    if config.interrupt_prob > 0:  # no draw otherwise: presets without it stay byte-identical
      interrupted = rng.random(n) < config.interrupt_prob
      item[interrupted] = trending[np.searchsorted(
          trending_cdf, rng.random(int(interrupted.sum())), side="right")]
      thread = ~interrupted
    clicks[offsets[:n] + t] = item
    # An interruption moves neither the last thread click nor the category.
    last_item[:n][thread] = item[thread]
    current_cat[:n][thread] = item_cat[item[thread]]

  # Times: sessions of clicks minutes apart, sessions hours apart.
  total = offsets[-1]
  gaps_ms = np.where(rng.random(total) < 0.15, rng.exponential(8 * 3600e3, total),
                     rng.exponential(3 * 60e3, total)).astype(np.int64) + 1000
  user_of_click = np.repeat(np.arange(n_users), lengths_sorted)
  gaps_ms[offsets[:-1]] = rng.integers(0, config.days * 86400_000 // 2, n_users)
  ts = config.start_ms + np.cumsum(gaps_ms) - np.repeat(
      np.cumsum(gaps_ms)[offsets[:-1]] - gaps_ms[offsets[:-1]], lengths_sorted)

  raw_user = order[user_of_click]  # user ids are 0..U-1 in creation order
  raw_item = rng.permutation(n_items)  # article ids carry no information
  raw_cat = rng.permutation(n_cats)
  context = _context_columns(rng, n_users)
  log = pd.DataFrame({
      "user_id": raw_user,
      "click_article_id": raw_item[clicks],
      "click_timestamp": ts,
      **{name: values[raw_user] for name, values in context.items()},
      "click_referrer_type": rng.choice(np.arange(1, 8), size=total,
                                        p=[.4, .3, .1, .08, .06, .04, .02]),
  })
  log = log.sort_values(["click_timestamp", "user_id"], kind="stable").reset_index(drop=True)

  first_click = np.full(n_items, np.iinfo(np.int64).max)
  np.minimum.at(first_click, clicks, ts)
  never = first_click == np.iinfo(np.int64).max
  first_click[never] = config.start_ms + config.days * 86400_000
  created = first_click - rng.exponential(2 * 86400e3, n_items).astype(np.int64)
  articles = pd.DataFrame({
      "article_id": raw_item,
      "category_id": raw_cat[item_cat],
      "created_at_ts": created,
      "words_count": np.maximum(10, rng.lognormal(np.log(190), 0.4, n_items)).astype(np.int64),
  }).sort_values("article_id").reset_index(drop=True)
  if config.interrupt_prob > 0:
    log.attrs["trending_article_ids"] = np.sort(raw_item[trending])
  return log, articles


def _context_columns(rng: np.random.Generator, n_users: int) -> dict[str, np.ndarray]:
  """Per-user device/location columns of the news schema (no signal)."""

  def skewed(n_values: int, size: int) -> np.ndarray:
    p = 1.0 / np.arange(1, n_values + 1) ** 1.5
    return rng.choice(np.arange(1, n_values + 1), size=size, p=p / p.sum())

  return {
      "click_environment": rng.choice([4, 2, 1], size=n_users, p=[.95, .04, .01]),
      "click_deviceGroup": skewed(5, n_users),
      "click_os": skewed(20, n_users),
      "click_country": skewed(11, n_users),
      "click_region": skewed(28, n_users),
  }


def write(config: SyntheticConfig, output_dir: Path | str, overwrite: bool = False) -> Path:
  """Writes train_click_log.csv and articles.csv into `output_dir`, atomically."""
  log, articles = generate(config)
  with locked_output(output_dir, "synthetic data writer"), output_errors(output_dir), \
      atomic_directory(output_dir, overwrite=overwrite, own_file=SYNTHETIC_FILE,
                       job="synthetic data") as tmp:
    log.to_csv(tmp / NEWS_CLICKS, index=False)
    articles.to_csv(tmp / NEWS_ARTICLES, index=False)
    write_json_atomic(tmp / SYNTHETIC_FILE, dataclasses.asdict(config))
  return Path(output_dir)
