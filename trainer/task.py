"""Tasks: what the generic train loop asks of a kind of model.

A Task class builds its model (`build_model`), makes its evaluators
(`make_evaluator`, `evaluate_every_split`), exports it (`export`) and, as an
instance, turns a parsed batch into this replica's share of the global mean
loss. trainer/registry.py maps each model name to its Task class.

The loss has two halves: `forward` (the model: dense, static shapes, what
the trainer XLA-compiles) and `loss` (outside XLA: it may gather rows of a
data-dependent count and run collectives across replicas, neither of which
an XLA cluster nested in a replica step can do; the catalogue softmax
XLA-compiles its own cross-entropy on bucket-padded rows). The loss of a batch is
`task.loss(task.forward(batch, training, step), step)`; `step` seeds the
dropout masks and the negative pool, so a resumed run repeats them.

RetrievalTask (sasrec, two_tower): the in-batch softmax loss (--loss=in_batch),
the softmax over the whole catalogue (--loss=softmax), or the sampled softmax
over --num_sampled catalogue negatives per step (--loss=sampled_softmax;
the sample is a function of (seed, step) only, so every replica and a
resumed run draw the same one).

positions data (and --noall_positions): one query per example, the last
position, whose positive is the example's target (the notebooks).
windows data with --all_positions: every real position j of the window is a
query whose positive is the next click (history[j + 1], or the target at the
last position), so each training click is predicted once per epoch.

RankingTask (dien): binary cross-entropy of the click label of each (user,
candidate) example, plus --aux_loss_weight times DIEN's auxiliary loss.
"""

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import tensorflow as tf

from contracts import manifest as mf
from trainer import config as config_lib
from trainer import evaluation, export, models, ranking_eval
from trainer.config import TrainerConfig
from trainer.losses import (CatalogueSampler, CatalogueSoftmaxLoss, InBatchSoftmaxLoss,
                            SampledSoftmaxLoss)
from trainer.models import RetrievalModel


def step_seed(seed: int, step: tf.Tensor | int) -> tf.Tensor:
  """[2] int64 keying dropout and sampling of one step on one replica.

  A function of (seed, step, replica) only, so a resumed run repeats it.
  """
  ctx = tf.distribute.get_replica_context()
  replica = ctx.replica_id_in_sync_group if ctx is not None else 0
  return tf.stack([tf.constant(seed, tf.int64),
                   tf.cast(step, tf.int64) * 4096 + tf.cast(replica, tf.int64)])


def sample_seed(seed: int, step: tf.Tensor | int) -> tf.Tensor:
  """[2] int64 keying the catalogue sample of one step: the same on every replica."""
  return tf.stack([tf.constant(seed, tf.int64) + 1_000_000_007, tf.cast(step, tf.int64)])


def item_target_counts(manifest: mf.Manifest) -> np.ndarray:
  """Training target count of every item index (float64)."""
  counts = pq.read_table(manifest.path(mf.ITEMS_FILE), columns=[mf.ITEM_FREQUENCY_COLUMN])
  return counts.column(0).to_numpy().astype(np.float64)


def item_log_q(manifest: mf.Manifest) -> np.ndarray:
  """log P(item is a training target): the in-batch candidate distribution."""
  counts = item_target_counts(manifest)
  # Items never trained on never appear as candidates; keep their log finite.
  return np.log(np.maximum(counts, 1.0) / max(counts.sum(), 1.0)).astype(np.float32)


class Task:
  """What the train loop calls (docs/extending.md has the table).

  Class methods work before the task exists: `build_model` inside the
  strategy scope, the evaluators, the export. An instance holds the loss:
  `forward(batch, training, step)` (XLA-compiled when the registry entry
  allows) and `loss(outputs, step)` (outside XLA).
  """

  @classmethod
  def build_model(cls, config: TrainerConfig, manifest, model_class: type):
    raise NotImplementedError

  @classmethod
  def make_evaluator(cls, config: TrainerConfig, manifest, max_users: int = 0,
                     split: str | None = None):
    raise NotImplementedError

  @classmethod
  def evaluate_every_split(cls, config: TrainerConfig, manifest, model,
                           reranked_dir: Path | None = None) -> tuple[dict, str]:
    """The final evaluation, (metrics, headline): the evaluator's split only."""
    evaluator = cls.make_evaluator(config, manifest)
    result = evaluator.evaluate(model, reranked_dir=reranked_dir)
    return result, evaluator.headline(result)

  @classmethod
  def export(cls, model, config: TrainerConfig, manifest, model_dir: Path, step: int) -> Path:
    raise NotImplementedError

  @classmethod
  def describe(cls, config: TrainerConfig, manifest) -> str:
    """What the start-of-training log line adds after the batch size."""
    del config, manifest
    return ""


def data_spec(manifest: mf.Manifest) -> models.DataSpec:
  category = pq.read_table(manifest.path(mf.ITEMS_FILE), columns=["category"])
  return models.DataSpec(
      num_items=manifest.vocab_sizes["items"], num_users=manifest.vocab_sizes["users"],
      num_categories=manifest.vocab_sizes["categories"], max_seq_len=manifest.max_seq_len,
      item_category=category.column(0).to_numpy().astype(np.int32))


class RetrievalTask(Task):
  """Next-item retrieval of sasrec and two_tower (see the module docstring).

  The model is a models.RetrievalModel: query vectors at every position and
  item vectors. Evaluation is leave-one-out full ranking (or sampled
  negatives) on the held-out splits; the export is a user tower and the item
  vectors for the retrieval job.
  """

  @classmethod
  def build_model(cls, config: TrainerConfig, manifest: mf.Manifest,
                  model_class: type) -> RetrievalModel:
    """The model with its variables created (call inside the strategy scope)."""
    return models.build(model_class, config, data_spec(manifest))

  @classmethod
  def make_evaluator(cls, config: TrainerConfig, manifest: mf.Manifest, max_users: int = 0,
                     split: str | None = None) -> evaluation.Evaluator:
    """The evaluator of --eval_split, or of `split`."""
    c = config
    return evaluation.Evaluator(manifest, split or c.eval_split, c.eval_topk, c.eval_negatives,
                                c.eval_batch_size, max_users, c.seed)

  @classmethod
  def evaluate_every_split(cls, config: TrainerConfig, manifest: mf.Manifest, model,
                           reranked_dir: Path | None = None) -> tuple[dict, str]:
    """--eval_split's metrics, and every held-out split's under "by_split"
    (valid to choose on, test to report), so one run gives both."""
    del reranked_dir
    evaluator = cls.make_evaluator(config, manifest)
    result = evaluator.evaluate(model)
    headline = evaluator.headline(result)
    by_split = {config.eval_split: result}
    for split in manifest.eval_splits:
      if split not in by_split:
        other = cls.make_evaluator(config, manifest, split=split)
        by_split[split] = other.evaluate(model)
        headline += "; " + other.headline(by_split[split])
    return {**result, "by_split": by_split}, headline

  @classmethod
  def export(cls, model, config: TrainerConfig, manifest: mf.Manifest, model_dir: Path,
             step: int) -> Path:
    return export.export(model, config.model, manifest, model_dir, step)

  @classmethod
  def describe(cls, config: TrainerConfig, manifest: mf.Manifest) -> str:
    return f", loss {config_lib.resolved_loss(config, manifest)}"

  def __init__(self, config: TrainerConfig, manifest: mf.Manifest, model: RetrievalModel):
    self.model = model
    self.all_positions = config.all_positions and manifest.samples == "windows"
    self.log_q = tf.constant(item_log_q(manifest))
    self.num_items = manifest.vocab_sizes["items"]
    loss = config_lib.resolved_loss(config, manifest)
    self.catalogue_softmax = loss == "softmax"
    self.softmax_loss = CatalogueSoftmaxLoss(config.temperature)
    self.num_sampled = config.num_sampled if loss == "sampled_softmax" else 0
    if self.num_sampled:
      self.sampler = CatalogueSampler(self.num_items, config.sampler,
                                      item_target_counts(manifest))
      self.sampled_loss = SampledSoftmaxLoss(config.temperature)
    self.in_batch_loss = InBatchSoftmaxLoss(
        temperature=config.temperature,
        remove_accidental_hits=config.remove_accidental_hits,
        logq_correction=config.logq_correction,
        symmetric=config.symmetric_loss,
        cross_replica=config.cross_replica_negatives,
        num_negatives=config.num_negatives)
    self.seed = config.seed

  def forward(self, batch: dict[str, tf.Tensor], training: bool = True,
              step: tf.Tensor | int = 0) -> dict[str, tf.Tensor]:
    """Queries [n, d], their positives and weights [n], and the item vectors:
    of every item (catalogue softmax) or of each positive (in-batch and
    sampled; the sampled softmax adds the step's sample and its vectors)."""
    history, target = batch[mf.FEATURE_HISTORY], batch[mf.FEATURE_TARGET]
    seed = step_seed(self.seed, step)  # keys the dropout masks
    if self.all_positions:
      queries = self.model.query_sequence(history, batch[mf.FEATURE_USER], training=training,
                                          seed=seed)
      positives = tf.concat([history[:, 1:], target[:, None]], axis=1)
      weights = tf.reshape(tf.cast(tf.not_equal(history, 0), tf.float32), [-1])
      queries = tf.reshape(queries, [-1, tf.shape(queries)[-1]])
      positives = tf.reshape(positives, [-1])
    else:
      # One example per target (positions data): only the last query is
      # needed, and computing the others cost the two-tower step 3x.
      queries = self.model.query_last(history, batch[mf.FEATURE_USER], training=training,
                                      seed=seed)
      positives = target
      weights = tf.ones(tf.shape(target), tf.float32)
    outputs = {"queries": queries, "positives": positives, "weights": weights}
    if self.num_sampled:
      sample = self.sampler.sample(self.num_sampled, sample_seed(self.seed, step))
      vectors = self.model.item_vectors(tf.concat([positives, sample], axis=0),
                                        training=training, seed=seed)
      n = tf.shape(positives)[0]
      return {**outputs, "item_vectors": vectors[:n], "sample": sample,
              "sample_vectors": vectors[n:]}
    items = tf.range(self.num_items) if self.catalogue_softmax else positives
    return {**outputs, "item_vectors": self.model.item_vectors(items, training=training,
                                                               seed=seed)}

  def loss(self, outputs: dict[str, tf.Tensor], step: tf.Tensor | int = 0) -> tf.Tensor:
    """This replica's share of the global mean loss (see losses.py)."""
    queries, positives, weights = outputs["queries"], outputs["positives"], outputs["weights"]
    if self.catalogue_softmax:
      return self.softmax_loss(queries, outputs["item_vectors"], positives, weights)
    if self.num_sampled:
      sample = outputs["sample"]
      return self.sampled_loss(queries, outputs["item_vectors"], positives, weights,
                               outputs["sample_vectors"], sample,
                               self.sampler.log_expected_count(positives, self.num_sampled),
                               self.sampler.log_expected_count(sample, self.num_sampled))
    return self.in_batch_loss(queries, outputs["item_vectors"], positives, weights,
                              tf.gather(self.log_q, positives),
                              seed=step_seed(self.seed, step))  # keys the negative pool


class RankingTask(Task):
  """Pointwise click-through ranking of retrieval candidates (dien).

  Trained on ranking data (preprocess --mode=ranking), evaluated on its
  held-out lists (AUC, GAUC, reranked HitRate/NDCG), exported as a serving
  module that scores (user, history, candidate, dense features).
  """

  @classmethod
  def build_model(cls, config: TrainerConfig, manifest: mf.RankingManifest, model_class: type):
    """The model with its variables created (call inside the strategy scope)."""
    category = pq.read_table(manifest.path(mf.ITEMS_FILE), columns=["category"])
    model = model_class(
        num_items=manifest.vocab_sizes["items"], num_users=manifest.vocab_sizes["users"],
        num_categories=manifest.vocab_sizes["categories"],
        item_category=category.column(0).to_numpy().astype(np.int32),
        max_hist_len=manifest.max_hist_len,
        dense_mean=np.asarray(manifest.dense_mean, np.float32),
        dense_var=np.asarray(manifest.dense_var, np.float32),
        dense_log1p=np.asarray(manifest.dense_log1p, bool), emb_dim=config.emb_dim,
        gru_units=config.gru_units, evolution=config.evolution, mlp_units=config.mlp_units,
        dropout=config.dropout, aux_loss=config.aux_loss_weight > 0,
        wide_dense=config.wide_dense,
        item_vectors=np.load(manifest.path(mf.RANKING_ITEM_VECTORS_FILE))
        if config.retrieval_item_vectors else None, name=config.model)
    model.build_variables()
    return model

  @classmethod
  def make_evaluator(cls, config: TrainerConfig, manifest: mf.RankingManifest,
                     max_users: int = 0, split: str | None = None):
    del split  # one held-out split
    return ranking_eval.RankingEvaluator(manifest, config.rank_eval_topk, max_users=max_users,
                                         seed=config.seed)

  @classmethod
  def export(cls, model, config: TrainerConfig, manifest: mf.RankingManifest, model_dir: Path,
             step: int) -> Path:
    return export.export_ranker(model, config.model, manifest, model_dir, step)

  def __init__(self, config: TrainerConfig, manifest: mf.RankingManifest, model):
    del manifest
    self.model = model
    self.seed = config.seed
    self.aux_loss_weight = config.aux_loss_weight

  def forward(self, batch: dict[str, tf.Tensor], training: bool = True,
              step: tf.Tensor | int = 0) -> dict[str, tf.Tensor]:
    logits, aux_loss = self.model.forward(batch, training=training,
                                          seed=step_seed(self.seed, step))
    return {"logits": logits, "aux_loss": aux_loss,
            "labels": tf.cast(batch[mf.FEATURE_LABEL], tf.float32)}

  def loss(self, outputs: dict[str, tf.Tensor], step: tf.Tensor | int = 0) -> tf.Tensor:
    del step
    bce = tf.nn.sigmoid_cross_entropy_with_logits(labels=outputs["labels"],
                                                  logits=outputs["logits"])
    ctx = tf.distribute.get_replica_context()
    replicas = ctx.num_replicas_in_sync if ctx is not None else 1
    # Replica batches are equal, so the shares sum to the global mean.
    share = tf.reduce_mean(bce) + self.aux_loss_weight * outputs["aux_loss"]
    return share / tf.cast(replicas, tf.float32)
