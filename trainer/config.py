"""Trainer configuration: one dataclass, validated before TensorFlow starts.

Nothing here imports TensorFlow, so inconsistent flags fail in milliseconds
with one line naming the flag. `TrainerConfig` is saved as JSON in
`model_dir`; a re-run with another architecture in the same directory is
refused (its checkpoints would not fit).
"""

import dataclasses
import json
from pathlib import Path
from typing import Any

from preprocess import manifest as mf
from preprocess.errors import ConfigError, DataError
from trainer import cluster

MODELS = ("sasrec", "two_tower", "dien")
RANKING_MODELS = ("dien",)  # trained on ranking data (preprocess --mode=ranking)
EVOLUTIONS = ("aigru", "augru")
STRATEGIES = ("default", "one_device", "mirrored", "multi_worker")
LR_SCHEDULES = ("constant", "cosine")
LOSSES = ("auto", "in_batch", "softmax", "sampled_softmax")
SAMPLERS = ("uniform", "popularity")
MODES = ("train", "eval")
# What --mode=eval takes from the command line; everything else is the
# trained model's (model_dir/trainer_config.json).
EVALUATION_FIELDS = ("data_dir", "eval_split", "eval_topk", "eval_negatives", "eval_batch_size",
                     "eval_max_users", "rank_eval_topk", "seed", "eval_checkpoint",
                     "eval_metrics_file")
CONFIG_FILE = "trainer_config.json"
CHECKPOINT_DIR = "checkpoints"  # under model_dir
# The loss holds a (queries x negatives) logits matrix per step; 2**27 float32
# entries (512 MB, and as much again for its gradient) is the most we allow.
# Counted over every position, although the catalogue softmax computes the
# real (non-padding) ones only, so the bound is conservative.
MAX_LOGITS = 2**27
# Defaults that depend on --model (None in TrainerConfig until resolved).
# sasrec's are the sparse, short-sequence recipe (configs/beauty_sasrec.flags,
# chosen on Beauty's validation split, confirmed unchanged on Yelp;
# BUILD_NOTES.md, "Model selection on sparse logs"): with early stopping a
# constant rate of 1e-3 and dropout 0.2 win, temperature 0.05 converges
# sooner than 0.1, weight decay 1.0 beat 0 and 3.0, 128 dimensions beat
# 64 and 256, and shared item embeddings with item dropout (the dataclass
# defaults below) beat projection heads. Dense logs with long histories (ML-1M) train longer with cosine
# decay and no dropout: their recipe sets that. The catalogue softmax when it
# fits. two_tower keeps what it was measured with; the ranker its ablation's
# settings (it has no temperature).
MODEL_DEFAULTS = {
    "sasrec": {"loss": "auto", "dropout": 0.2, "learning_rate": 1e-3, "lr_schedule": "constant",
               "temperature": 0.05, "weight_decay": 1.0, "epochs": 200, "emb_dim": 128,
               "ff_dim": 256},
    "two_tower": {"loss": "auto", "dropout": 0.0, "learning_rate": 2e-3,
                  "lr_schedule": "cosine", "temperature": 0.05, "weight_decay": 0.0,
                  "epochs": 20, "emb_dim": 64, "ff_dim": 128},
    "dien": {"loss": "in_batch", "dropout": 0.2, "learning_rate": 1e-3,
             "lr_schedule": "constant", "temperature": 0.05, "weight_decay": 0.0, "epochs": 20,
             "emb_dim": 64, "ff_dim": 128},
}
# Model selection: the retrieval models evaluate the valid split every epoch,
# export the best evaluation and stop after `early_stopping_patience`
# evaluations without improvement; the ranker's held-out lists are its test
# data, so it has no selection split and keeps the last step.
SELECTION_DEFAULTS = {
    "sasrec": {"early_stopping_metric": "ndcg@10", "eval_every_epochs": 1,
               "early_stopping_patience": 10},
    "two_tower": {"early_stopping_metric": "ndcg@10", "eval_every_epochs": 1,
                  "early_stopping_patience": 10},
    "dien": {"early_stopping_metric": "", "eval_every_epochs": 0, "early_stopping_patience": 0},
}
for _model, _defaults in SELECTION_DEFAULTS.items():
  MODEL_DEFAULTS[_model].update(_defaults)
MODEL_DEFAULT_FIELDS = tuple(MODEL_DEFAULTS["sasrec"])
SELECTION_SPLIT = "valid"  # early stopping never looks at test
# Fields that define the variables a checkpoint holds.
# What a trainer_config.json written before a field existed meant by it.
LEGACY_VALUES = {"share_item_embeddings": False, "item_dropout": 0.0}
ARCHITECTURE_FIELDS = ("model", "emb_dim", "num_heads", "num_blocks", "ff_dim",
                       "share_item_embeddings", "tower_units",
                       "mixed_precision", "gru_units", "evolution", "aux_loss_weight",
                       "retrieval_item_vectors", "wide_dense")


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
  """Every trainer flag. Defaults are the recipe that trains well (BUILD_NOTES.md)."""
  model: str = "sasrec"
  mode: str = "train"  # eval: evaluate a checkpoint, train nothing, write only eval_metrics_file
  data_dir: str = ""
  model_dir: str = ""
  strategy: str = "default"
  num_cpu_replicas: int = 0  # mirrored/multi_worker over N logical CPUs (tests, no GPU)
  # Optimisation.
  batch_size: int = 128  # global, over all replicas
  epochs: int | None = None  # MODEL_DEFAULTS; with early stopping the most it trains
  train_steps: int = 0  # > 0: overrides epochs
  learning_rate: float | None = None  # None: MODEL_DEFAULTS
  lr_schedule: str | None = None
  warmup_steps: int = 100
  # Decoupled (AdamW) decay of kernels and embeddings, times the scheduled rate.
  weight_decay: float | None = None
  seed: int = 42
  shuffle_buffer: int = 16384
  # Model size.
  emb_dim: int | None = None  # MODEL_DEFAULTS
  num_heads: int = 1  # sasrec (1 and 1 won on Beauty; configs/ml1m_sasrec.flags sets 2 and 2)
  num_blocks: int = 1
  ff_dim: int | None = None  # sasrec's feed-forward width (MODEL_DEFAULTS)
  # sasrec: score against the input item embeddings themselves (SASRec's
  # shared embedding) instead of separate query/item projection heads, and
  # drop out those item embeddings in the softmax while training.
  share_item_embeddings: bool = True
  item_dropout: float = 0.2
  dropout: float | None = None
  temperature: float | None = None
  tower_units: tuple[int, ...] = (128, 64)  # two_tower tower / dien top MLP hidden layers
  # dien (the ranker).
  gru_units: int = 32
  # The DIEN paper's AUGRU and auxiliary loss (the notebook: aigru, 0): they are
  # what makes the ranker beat the retrieval order on ML-1M (BUILD_NOTES.md).
  evolution: str = "augru"
  aux_loss_weight: float = 1.0
  retrieval_item_vectors: bool = True  # item representation += frozen retrieval vectors
  wide_dense: bool = True  # + a linear logit over the standardised dense features
  rank_eval_topk: tuple[int, ...] = (5, 10)
  # Loss.
  # softmax: the whole catalogue; in_batch: negatives from the batch; auto:
  # softmax when its logits fit MAX_LOGITS (see resolved_loss).
  loss: str | None = None
  num_sampled: int = 256  # sampled_softmax: catalogue negatives per step
  sampler: str = "uniform"  # sampled_softmax: uniform or popularity (training targets)
  symmetric_loss: bool = False
  cross_replica_negatives: bool = True
  remove_accidental_hits: bool = True
  logq_correction: bool = True
  all_positions: bool = True  # windows data: a loss on every position
  num_negatives: int = 0  # > 0: a random pool of that many in-batch negatives per step
  # Loop, checkpoints, evaluation.
  steps_per_loop: int = 50
  log_every_steps: int = 100
  checkpoint_every_steps: int = 500
  keep_checkpoints: int = 3
  eval_every_steps: int = 0  # 0: only at the end
  # None: SELECTION_DEFAULTS (0 when eval_every_steps is set).
  eval_every_epochs: int | None = None
  # Model selection on the valid split: "" off; else a metric the evaluation
  # writes (ndcg@10, hit_rate@20, ...). The best evaluation is kept in
  # checkpoints/best and is what the final evaluation and the export use.
  early_stopping_metric: str | None = None
  early_stopping_patience: int | None = None  # evaluations without improvement; 0: never stop
  eval_split: str = "valid"
  eval_topk: tuple[int, ...] = (10, 20, 50)
  eval_negatives: int = 0  # > 0: rank the target among N sampled unseen items
  eval_batch_size: int = 512
  eval_max_users: int = 0  # > 0: evaluate a seeded random subset (periodic evals)
  mixed_precision: bool = False
  # None: XLA for the retrieval models, not for dien (its unrolled GRUs ran
  # 1.4x slower under XLA on CPU, after a 45 s compile; BUILD_NOTES.md).
  jit_compile: bool | None = None
  export: bool = True
  # --mode=eval: "" (best if the run kept one, else latest), best, latest or a checkpoint path.
  eval_checkpoint: str = ""
  eval_metrics_file: str = ""  # --mode=eval: where the metrics go ("" prints them)

  def __post_init__(self):
    # Resolved once, at construction: dataclasses.replace(config, model=...)
    # keeps the first model's values, so build a new config to switch models.
    # An unknown model resolves like sasrec; validate() then names the flag.
    defaults = dict(MODEL_DEFAULTS.get(self.model, MODEL_DEFAULTS["sasrec"]))
    if self.eval_every_steps:  # an interval in steps replaces the per-epoch default
      defaults["eval_every_epochs"] = 0
    for field, value in defaults.items():
      if getattr(self, field) is None:
        object.__setattr__(self, field, value)

  def eval_interval_steps(self, steps_per_epoch: int) -> int:
    """Steps between periodic evaluations (0: none)."""
    return self.eval_every_steps or self.eval_every_epochs * steps_per_epoch

  @property
  def selects_best(self) -> bool:
    return bool(self.early_stopping_metric)

  @property
  def use_xla(self) -> bool:
    if self.jit_compile is not None:
      return self.jit_compile
    return self.model not in RANKING_MODELS

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "TrainerConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in fields}
    return cls(**{**{k: v for k, v in LEGACY_VALUES.items() if k not in d}, **values})


def known_replica_count(config: TrainerConfig) -> int | None:
  """Replicas the strategy will have, when knowable without starting TF."""
  if config.strategy in ("default", "one_device"):
    return 1
  if config.strategy == "mirrored" and config.num_cpu_replicas:
    return config.num_cpu_replicas
  return None  # GPU counts and multi-worker clusters are checked once TF is up


def validate(config: TrainerConfig) -> mf.Manifest | mf.RankingManifest:
  """Checks every flag against the others and the data; returns the manifest."""
  def bad(message: str):
    raise ConfigError(message)

  if config.model not in MODELS:
    bad(f"--model={config.model!r}: choose from {', '.join(MODELS)}")
  if config.mode not in MODES:
    bad(f"--mode={config.mode!r}: choose from {', '.join(MODES)}")
  if config.strategy not in STRATEGIES:
    bad(f"--strategy={config.strategy!r}: choose from {', '.join(STRATEGIES)}")
  if not config.data_dir:
    bad("--data_dir is required")
  if not config.model_dir:
    bad("--model_dir is required")
  for name in ("batch_size", "emb_dim", "num_heads", "num_blocks", "ff_dim", "steps_per_loop",
               "log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
               "eval_batch_size", "shuffle_buffer", "num_sampled"):
    if getattr(config, name) < 1:
      bad(f"--{name}={getattr(config, name)}: must be >= 1")
  for name in ("epochs", "train_steps", "warmup_steps", "eval_every_steps", "eval_negatives",
               "num_negatives", "eval_every_epochs", "early_stopping_patience",
               "eval_max_users", "num_cpu_replicas"):
    if getattr(config, name) < 0:
      bad(f"--{name}={getattr(config, name)}: must be >= 0")
  if config.loss not in LOSSES:
    bad(f"--loss={config.loss!r}: choose from {', '.join(LOSSES)}")
  if config.loss in ("softmax", "sampled_softmax") and (config.symmetric_loss or
                                                        config.num_negatives):
    bad("--symmetric_loss and --num_negatives apply to --loss=in_batch only")
  if config.sampler not in SAMPLERS:
    bad(f"--sampler={config.sampler!r}: choose from {', '.join(SAMPLERS)}")
  if config.eval_every_steps and config.eval_every_epochs:
    bad(f"--eval_every_steps={config.eval_every_steps} and --eval_every_epochs="
        f"{config.eval_every_epochs}: set one of them")
  _check_selection(config)
  if config.symmetric_loss and config.num_negatives:
    bad("--symmetric_loss needs the full in-batch pool (--num_negatives=0)")
  if config.epochs == 0 and config.train_steps == 0:
    bad("--epochs=0 and --train_steps=0: nothing to train")
  if config.evolution not in EVOLUTIONS:
    bad(f"--evolution={config.evolution!r}: choose from {', '.join(EVOLUTIONS)}")
  if config.gru_units < 1:
    bad(f"--gru_units={config.gru_units}: must be >= 1")
  if config.aux_loss_weight < 0:
    bad(f"--aux_loss_weight={config.aux_loss_weight}: must be >= 0")
  if not config.rank_eval_topk or min(config.rank_eval_topk) < 1:
    bad(f"--rank_eval_topk={','.join(map(str, config.rank_eval_topk))}: cut-offs must be >= 1")
  if config.model == "sasrec" and config.emb_dim % config.num_heads:
    bad(f"--emb_dim={config.emb_dim} is not divisible by --num_heads={config.num_heads}")
  if not 0.0 <= config.dropout < 1.0:
    bad(f"--dropout={config.dropout}: must be in [0, 1)")
  if not 0.0 <= config.item_dropout < 1.0:
    bad(f"--item_dropout={config.item_dropout}: must be in [0, 1)")
  if config.temperature <= 0:
    bad(f"--temperature={config.temperature}: must be > 0")
  if config.learning_rate <= 0:
    bad(f"--learning_rate={config.learning_rate}: must be > 0")
  if config.weight_decay < 0:
    bad(f"--weight_decay={config.weight_decay}: must be >= 0")
  if config.lr_schedule not in LR_SCHEDULES:
    bad(f"--lr_schedule={config.lr_schedule!r}: choose from {', '.join(LR_SCHEDULES)}")
  if not config.eval_topk or min(config.eval_topk) < 1:
    bad(f"--eval_topk={','.join(map(str, config.eval_topk))}: cut-offs must be >= 1")
  if any(u < 1 for u in config.tower_units):
    bad(f"--tower_units={','.join(map(str, config.tower_units))}: units must be >= 1")
  if config.num_cpu_replicas and config.strategy != "mirrored":
    bad(f"--num_cpu_replicas={config.num_cpu_replicas} needs --strategy=mirrored")
  if config.strategy == "multi_worker":
    cluster.from_environment()  # ConfigError naming what is wrong with TF_CONFIG
  replicas = known_replica_count(config)
  if replicas and config.batch_size % replicas:
    bad(f"--batch_size={config.batch_size} is not divisible by the {replicas} replicas")

  if config.mode == "eval":
    from trainer import selection  # no TensorFlow
    selection.checkpoint_to_evaluate(Path(config.model_dir) / CHECKPOINT_DIR,
                                     config.eval_checkpoint)
  if config.model in RANKING_MODELS:
    try:
      manifest = mf.load_ranking(config.data_dir)
    except DataError as e:
      bad(f"--data_dir: {e}")
    check_saved_config(config)
    _check_shard_sizes(manifest)
    return manifest
  try:
    manifest = mf.load(config.data_dir)
  except DataError as e:
    bad(f"--data_dir: {e}")
  _check_shard_sizes(manifest)
  if config.selects_best and SELECTION_SPLIT not in manifest.eval_splits:
    bad(f"--early_stopping_metric={config.early_stopping_metric}: {config.data_dir} has no "
        f"{SELECTION_SPLIT!r} split to select on")
  if config.eval_split not in manifest.eval_splits:
    bad(f"--eval_split={config.eval_split}: {config.data_dir} was preprocessed with "
        f"--holdout={manifest.holdout}, which has {', '.join(manifest.eval_splits)}")
  if config.eval_negatives and config.eval_negatives >= manifest.vocab_sizes["items"] - 1:
    bad(f"--eval_negatives={config.eval_negatives}: the catalogue has only "
        f"{manifest.vocab_sizes['items'] - 1} items")
  if config.loss == "sampled_softmax" and config.num_sampled > manifest.vocab_sizes["items"] - 1:
    bad(f"--num_sampled={config.num_sampled}: the catalogue has only "
        f"{manifest.vocab_sizes['items'] - 1} items")
  queries = loss_positions_per_step(config, manifest)
  if config.loss == "sampled_softmax":
    if queries * config.num_sampled > MAX_LOGITS:
      bad(f"--loss=sampled_softmax: --batch_size={config.batch_size} gives {queries} loss "
          f"positions per step against --num_sampled={config.num_sampled}; lower one of them")
  elif resolved_loss(config, manifest) == "softmax":
    items = manifest.vocab_sizes["items"]
    if queries * items > MAX_LOGITS:
      bad(f"--loss=softmax: --batch_size={config.batch_size} gives {queries} loss positions per "
          f"step against {items} items, a {queries}x{items} logits matrix; lower --batch_size to "
          f"<= {max(1, config.batch_size * MAX_LOGITS // (queries * items))} or use "
          "--loss=in_batch")
  else:
    pool = min(config.num_negatives, queries) if config.num_negatives else queries
    if queries * pool > MAX_LOGITS:
      bad(f"--batch_size={config.batch_size} gives {queries} loss positions per step against "
          f"{pool} negatives, a {queries}x{pool} logits matrix; lower --batch_size or set "
          f"--num_negatives <= {max(1, MAX_LOGITS // queries)}")
  if max(config.eval_topk) > manifest.vocab_sizes["items"] - 1:
    bad(f"--eval_topk={max(config.eval_topk)} exceeds the {manifest.vocab_sizes['items'] - 1} "
        "items")
  check_saved_config(config)
  return manifest


def _check_selection(config: TrainerConfig) -> None:
  """Early-stopping flags against each other and the evaluation's metrics."""
  from retrieval.metrics import metric_names  # numpy only
  if not config.selects_best:
    return
  metric = config.early_stopping_metric
  if config.model in RANKING_MODELS:
    raise ConfigError(f"--early_stopping_metric={metric}: --model={config.model} is evaluated on "
                      "its test lists and has no validation split to select on; pass "
                      "--early_stopping_metric=''")
  names = metric_names(config.eval_topk)
  if metric not in names:
    raise ConfigError(f"--early_stopping_metric={metric}: the evaluation writes "
                      f"{', '.join(names)} (--eval_topk sets the cut-offs)")
  if not (config.eval_every_steps or config.eval_every_epochs):
    raise ConfigError(f"--early_stopping_metric={metric} (patience "
                      f"{config.early_stopping_patience}) needs periodic evaluation: set "
                      "--eval_every_epochs or --eval_every_steps, or turn selection off with "
                      "--early_stopping_metric=''")


def _check_shard_sizes(manifest: mf.Manifest | mf.RankingManifest) -> None:
  """Every shard's size against the manifest before the first step: one stat
  each. A shard cut on a record boundary reads without error, so waiting for
  a read error is not enough. SHA-256 stays for read errors (it reads every
  byte: seconds per gigabyte)."""
  for split in manifest.splits:
    manifest.verify_shards(split)  # DataError naming the shard


def loss_positions_per_step(config: TrainerConfig, manifest: mf.Manifest) -> int:
  windows = config.all_positions and manifest.samples == "windows"
  return config.batch_size * (manifest.max_seq_len if windows else 1)


def resolved_loss(config: TrainerConfig, manifest: mf.Manifest) -> str:
  """--loss, with auto resolved: the exact catalogue softmax when its (loss
  positions x items) logits fit MAX_LOGITS and no in-batch-only option is set,
  else in-batch negatives (BUILD_NOTES.md, the loss ablation on ML-1M)."""
  if config.loss != "auto":
    return config.loss  # softmax, in_batch or sampled_softmax
  if config.symmetric_loss or config.num_negatives:
    return "in_batch"
  fits = loss_positions_per_step(config, manifest) * manifest.vocab_sizes["items"] <= MAX_LOGITS
  return "softmax" if fits else "in_batch"


def check_saved_config(config: TrainerConfig) -> None:
  """The flags against the trainer_config.json of the checkpoints already in
  model_dir, if any: the architecture and the data must be the same."""
  path = Path(config.model_dir) / CONFIG_FILE
  if not path.is_file():
    return
  try:
    saved = TrainerConfig.from_dict(json.loads(path.read_text()))
  except (ValueError, TypeError) as e:
    raise ConfigError(f"--model_dir: {path} is not a trainer config ({e})") from e
  for name in ARCHITECTURE_FIELDS:
    if getattr(saved, name) != getattr(config, name):
      raise ConfigError(
          f"--{name}={getattr(config, name)} differs from {getattr(saved, name)} of the "
          f"checkpoints in {config.model_dir} (use another --model_dir)")
  if Path(saved.data_dir).absolute() != Path(config.data_dir).absolute():
    raise ConfigError(f"--data_dir={config.data_dir} differs from {saved.data_dir} the "
                      f"checkpoints in {config.model_dir} were trained on")


def for_evaluation(given: TrainerConfig, present: set[str]) -> TrainerConfig:
  """--mode=eval: the trained model's saved config with the evaluation flags
  the command line gave (`present`); a different architecture is refused."""
  path = Path(given.model_dir) / CONFIG_FILE
  if not given.model_dir:
    raise ConfigError("--model_dir is required")
  if not path.is_file():
    raise ConfigError(f"--mode=eval: {path} does not exist (--model_dir has no trained model)")
  try:
    saved = json.loads(path.read_text())
    trained = TrainerConfig.from_dict(saved)
  except (ValueError, TypeError) as e:
    raise ConfigError(f"--model_dir: {path} is not a trainer config ({e})") from e
  for name in sorted(present & set(ARCHITECTURE_FIELDS)):
    if getattr(given, name) != getattr(trained, name):
      raise ConfigError(f"--{name}={getattr(given, name)} differs from "
                        f"{getattr(trained, name)} of the model in {given.model_dir}")
  values = {**saved, "mode": "eval", "model_dir": given.model_dir}
  for name in present & set(EVALUATION_FIELDS):
    values[name] = getattr(given, name)
  return TrainerConfig.from_dict(values)


def save(config: TrainerConfig) -> None:
  from preprocess.fileio import write_json_atomic
  Path(config.model_dir).mkdir(parents=True, exist_ok=True)
  write_json_atomic(Path(config.model_dir) / CONFIG_FILE, config.to_dict())
