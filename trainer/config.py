"""Trainer configuration: one dataclass, validated before TensorFlow starts.

Nothing here imports TensorFlow, so inconsistent flags fail in milliseconds
with one line naming the flag. `TrainerConfig` is saved as JSON in
`model_dir`; a re-run with another architecture in the same directory is
refused (its checkpoints would not fit).
"""

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from contracts import manifest as mf
from contracts.errors import ConfigError, DataError
from contracts.model_layout import CHECKPOINT_DIR, CONFIG_FILE
from trainer import cluster, registry

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
# The loss holds a (queries x negatives) logits matrix per step; 2**27 float32
# entries (512 MB, and as much again for its gradient) is the most we allow.
# Counted over every position, although the catalogue softmax computes the
# real (non-padding) ones only, so the bound is conservative.
MAX_LOGITS = 2**27
SELECTION_SPLIT = "valid"  # early stopping never looks at test
# What a trainer_config.json written before a field existed meant by it.
LEGACY_VALUES = {"share_item_embeddings": False, "item_dropout": 0.0}
# Fields that define the variables a checkpoint holds (of those the model reads).
ARCHITECTURE_FIELDS = ("model", "emb_dim", "num_heads", "num_blocks", "ff_dim",
                       "share_item_embeddings", "tower_units", "mlp_units",
                       "mixed_precision", "gru_units", "evolution", "aux_loss_weight",
                       "retrieval_item_vectors", "wide_dense")


def _field(default, help: str, choices=None):
  """A config field with its flag's help text (trainer/main.py generates the flags)."""
  return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


def _by_model(help: str):
  """A field whose default is the model's (registry entry); None until resolved."""
  return dataclasses.field(default=None, metadata={"help": help, "by_model": True})


# Sections. A model reads the shared sections and its own (its registry
# entry's `sections`); its checks run only for the model that reads them.
# Every field is one flag of the same name, and TrainerConfig holds them all
# flat, as trainer_config.json does.

@dataclasses.dataclass(frozen=True)
class RunConfig:
  model: str = _field("sasrec", "Model to train (trainer/registry.py).")
  mode: str = _field("train", "train: train (or resume), evaluate, export. eval: evaluate "
                     "--eval_checkpoint of --model_dir on every held-out split and write only "
                     "--eval_metrics_file; the model's settings come from its "
                     "trainer_config.json, the evaluation flags from the command line.", MODES)
  data_dir: str = _field("", "preprocess output directory (has manifest.json).")
  model_dir: str = _field("", "Checkpoints, summaries, metrics and export go here.")
  strategy: str = _field("default", "tf.distribute strategy.", STRATEGIES)
  num_cpu_replicas: int = _field(0, "mirrored: split the CPU into N logical devices (testing "
                                 "without GPUs).")
  seed: int = _field(42, "Seed of initialisation, dropout and data order.")


@dataclasses.dataclass(frozen=True)
class OptimizationConfig:
  batch_size: int = _field(128, "Global batch size over all replicas.")
  epochs: int | None = _by_model("Epochs over the training split (with early stopping: the "
                                 "most it may train).")
  train_steps: int = _field(0, "If > 0: total steps (overrides --epochs).")
  learning_rate: float | None = _by_model("Peak Adam learning rate.")
  lr_schedule: str | None = dataclasses.field(default=None, metadata={
      "help": "After warm-up: constant, or cosine decay to 0 at the last step.",
      "choices": LR_SCHEDULES, "by_model": True})
  warmup_steps: int = _field(100, "Linear learning-rate warm-up steps.")
  weight_decay: float | None = _by_model(
      "Decoupled weight decay (AdamW) of kernels and embeddings, scaled by the learning rate; "
      "biases and LayerNorm are not decayed. 0: plain Adam.")
  shuffle_buffer: int = _field(16384, "Example shuffle buffer.")
  emb_dim: int | None = _by_model("Embedding and output vector size.")
  dropout: float | None = _by_model("Dropout rate.")


@dataclasses.dataclass(frozen=True)
class RetrievalLossConfig:
  """The next-item losses of the retrieval models (trainer/losses.py)."""
  loss: str | None = dataclasses.field(default=None, metadata={
      "help": "in_batch: in-batch negatives (any catalogue size); softmax: full softmax over "
              "every item (exact, for catalogues up to ~100k items); sampled_softmax: "
              "--num_sampled catalogue negatives per step; auto: softmax when its logits fit "
              "in memory, else in_batch.", "choices": LOSSES, "by_model": True})
  temperature: float | None = _by_model("Softmax temperature on cosine scores.")
  num_sampled: int = _field(256, "sampled_softmax: negatives drawn from the whole catalogue "
                            "per step, shared by every position and replica.")
  sampler: str = _field("uniform", "sampled_softmax: uniform over the catalogue, or popularity "
                        "(training target counts); logQ correction either way.", SAMPLERS)
  symmetric_loss: bool = _field(False, "Add the item->user softmax.")
  cross_replica_negatives: bool = _field(True, "Gather negatives from all replicas (the global "
                                         "batch).")
  remove_accidental_hits: bool = _field(True, "A batch item equal to the positive is not a "
                                        "negative.")
  logq_correction: bool = _field(True, "Subtract log sampling probability from in-batch "
                                 "logits.")
  all_positions: bool = _field(True, "windows data: a loss on every position, not only the "
                               "last.")
  num_negatives: int = _field(0, "0: every in-batch positive is a negative; N: a random pool "
                              "of N of them per step (bounds the all-position loss of windows "
                              "data).")

  @staticmethod
  def check(config) -> None:
    if config.loss not in LOSSES:
      raise ConfigError(f"--loss={config.loss!r}: choose from {', '.join(LOSSES)}")
    if config.loss in ("softmax", "sampled_softmax") and (config.symmetric_loss or
                                                          config.num_negatives):
      raise ConfigError("--symmetric_loss and --num_negatives apply to --loss=in_batch only")
    if config.sampler not in SAMPLERS:
      raise ConfigError(f"--sampler={config.sampler!r}: choose from {', '.join(SAMPLERS)}")
    if config.symmetric_loss and config.num_negatives:
      raise ConfigError("--symmetric_loss needs the full in-batch pool (--num_negatives=0)")
    if config.num_sampled < 1:
      raise ConfigError(f"--num_sampled={config.num_sampled}: must be >= 1")
    if config.num_negatives < 0:
      raise ConfigError(f"--num_negatives={config.num_negatives}: must be >= 0")
    if config.temperature <= 0:
      raise ConfigError(f"--temperature={config.temperature}: must be > 0")


@dataclasses.dataclass(frozen=True)
class SequenceEncoderConfig:
  """The history encoders of sasrec and gru4rec."""
  num_blocks: int = _field(1, "Transformer blocks (sasrec) or stacked GRU layers (gru4rec).")
  # Score against the input item embeddings themselves (SASRec's shared
  # embedding) instead of separate query/item projection heads, and drop out
  # those item embeddings in the softmax while training.
  share_item_embeddings: bool = _field(True, "Score against the input item embeddings (no "
                                       "projection heads).")
  item_dropout: float = _field(0.2, "Dropout of the item embeddings the softmax scores, in "
                               "training.")

  @staticmethod
  def check(config) -> None:
    if config.num_blocks < 1:
      raise ConfigError(f"--num_blocks={config.num_blocks}: must be >= 1")
    if not 0.0 <= config.item_dropout < 1.0:
      raise ConfigError(f"--item_dropout={config.item_dropout}: must be in [0, 1)")


@dataclasses.dataclass(frozen=True)
class SASRecConfig:
  # 1 and 1 won on Beauty; configs/ml1m_sasrec.flags sets 2 and 2.
  num_heads: int = _field(1, "Attention heads.")
  ff_dim: int | None = _by_model("Feed-forward width.")

  @staticmethod
  def check(config) -> None:
    for name in ("num_heads", "ff_dim"):
      if getattr(config, name) < 1:
        raise ConfigError(f"--{name}={getattr(config, name)}: must be >= 1")
    if config.emb_dim % config.num_heads:
      raise ConfigError(f"--emb_dim={config.emb_dim} is not divisible by "
                        f"--num_heads={config.num_heads}")


@dataclasses.dataclass(frozen=True)
class TwoTowerConfig:
  tower_units: tuple[int, ...] = _field((128, 64), "Hidden layer widths of both towers.")

  @staticmethod
  def check(config) -> None:
    if any(u < 1 for u in config.tower_units):
      raise ConfigError(f"--tower_units={','.join(map(str, config.tower_units))}: units must "
                        "be >= 1")


@dataclasses.dataclass(frozen=True)
class DIENConfig:
  gru_units: int = _field(32, "GRU state size (extractor and evolution).")
  # The DIEN paper's AUGRU and auxiliary loss (the notebook: aigru, 0): they are
  # what makes the ranker beat the retrieval order on ML-1M (BUILD_NOTES.md).
  evolution: str = _field("augru", "augru (attention scales the update gate, the DIEN paper's "
                          "best) or aigru (attention scales the GRU input, the notebook).",
                          EVOLUTIONS)
  aux_loss_weight: float = _field(1.0, "Weight of the auxiliary next-click loss on the "
                                  "interest extractor (the paper's 1; 0: off, the notebook).")
  mlp_units: tuple[int, ...] = _field((128, 64), "Hidden layer widths of the top MLP.")
  retrieval_item_vectors: bool = _field(True, "Add the retrieval model's item vectors (frozen) "
                                        "to every item's representation.")
  wide_dense: bool = _field(True, "Add a linear logit over the standardised dense features "
                            "(Wide & Deep).")
  rank_eval_topk: tuple[int, ...] = _field((5, 10), "HitRate/NDCG cut-offs of the reranked "
                                           "lists.")

  @staticmethod
  def check(config) -> None:
    if config.evolution not in EVOLUTIONS:
      raise ConfigError(f"--evolution={config.evolution!r}: choose from "
                        f"{', '.join(EVOLUTIONS)}")
    if config.gru_units < 1:
      raise ConfigError(f"--gru_units={config.gru_units}: must be >= 1")
    if config.aux_loss_weight < 0:
      raise ConfigError(f"--aux_loss_weight={config.aux_loss_weight}: must be >= 0")
    if any(u < 1 for u in config.mlp_units):
      raise ConfigError(f"--mlp_units={','.join(map(str, config.mlp_units))}: units must be "
                        ">= 1")
    if not config.rank_eval_topk or min(config.rank_eval_topk) < 1:
      raise ConfigError(f"--rank_eval_topk={','.join(map(str, config.rank_eval_topk))}: "
                        "cut-offs must be >= 1")


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  steps_per_loop: int = _field(50, "Steps per tf.function call.")
  log_every_steps: int = _field(100, "Progress line every N steps.")
  checkpoint_every_steps: int = _field(500, "Checkpoint every N steps (and at the end).")
  keep_checkpoints: int = _field(3, "Checkpoints kept.")
  mixed_precision: bool = _field(False, "float16 on GPU, bfloat16 on CPU compute; float32 "
                                 "variables and loss.")
  jit_compile: bool | None = _field(None, "XLA-compile the training step's forward pass "
                                    "(default: the model's registry entry decides).")
  export: bool = _field(True, "Export the model for serving (and the retrieval job).")


@dataclasses.dataclass(frozen=True)
class EvaluationConfig:
  eval_every_steps: int = _field(0, "Evaluate every N steps (0: only at the end).")
  eval_every_epochs: int | None = _by_model("Evaluate every N epochs (0 when "
                                            "--eval_every_steps is set).")
  # Model selection on the valid split: "" off; else a metric the evaluation
  # writes (ndcg@10, hit_rate@20, ...). The best evaluation is kept in
  # checkpoints/best and is what the final evaluation and the export use.
  early_stopping_metric: str | None = _by_model(
      "Select the model on this metric of the valid split at each periodic evaluation (e.g. "
      "ndcg@10, hit_rate@20); '' turns selection off.")
  early_stopping_patience: int | None = _by_model(
      "Stop after N periodic evaluations without improvement; 0: train every epoch and still "
      "export the best.")
  eval_split: str = _field("valid", "Split to evaluate on.", ("valid", "test"))
  eval_topk: tuple[int, ...] = _field((10, 20, 50), "HitRate/NDCG cut-offs.")
  eval_negatives: int = _field(0, "If > 0: rank the target among N sampled unseen items "
                               "(SASRec paper).")
  eval_batch_size: int = _field(512, "Users per evaluation batch.")
  eval_max_users: int = _field(0, "If > 0: periodic evaluations use this many seeded random "
                               "users.")
  eval_checkpoint: str = _field("", "--mode=eval: best, latest or a checkpoint path (default: "
                                "best when the run kept one, else latest).")
  eval_metrics_file: str = _field("", "--mode=eval: write the metrics JSON here (default: "
                                  "print it).")


# Model sections by name: registry entries list theirs.
SECTIONS = {section.__name__: section for section in (
    RetrievalLossConfig, SequenceEncoderConfig, SASRecConfig, TwoTowerConfig, DIENConfig)}
SHARED_SECTIONS = (RunConfig, OptimizationConfig, LoopConfig, EvaluationConfig)


def section_of(field_name: str) -> type:
  for section in (*SHARED_SECTIONS, *SECTIONS.values()):
    if field_name in section.__dataclass_fields__:
      return section
  raise KeyError(field_name)


# Base order decides the field order (the saved JSON's): the last base first.
@dataclasses.dataclass(frozen=True)
class TrainerConfig(EvaluationConfig, LoopConfig, DIENConfig, TwoTowerConfig, SASRecConfig,
                    SequenceEncoderConfig, RetrievalLossConfig, OptimizationConfig, RunConfig):
  """Every trainer flag, flat; the sections above say which model reads what.
  Defaults are the recipes that train well (docs/results.md)."""

  def __post_init__(self):
    # Resolved once, at construction: dataclasses.replace(config, model=...)
    # keeps the first model's values, so build a new config to switch models.
    # An unknown model resolves like sasrec; validate() then names the flag.
    known = self.model in registry.names()
    defaults = dict(registry.get(self.model if known else "sasrec").defaults)
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
    return registry.get(self.model).jit_compile

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def reads(self, field: str) -> bool:
    """Whether --model reads `field`: it is in a shared section or one of the model's."""
    return field in model_fields(self.model)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "TrainerConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in fields}
    legacy = {k: v for k, v in LEGACY_VALUES.items() if k not in d}
    if d.get("model") == "dien" and "mlp_units" not in d and "tower_units" in d:
      legacy["mlp_units"] = tuple(d["tower_units"])  # dien's top MLP was --tower_units
    return cls(**{**legacy, **values})


# Fields whose default depends on --model (None in TrainerConfig until
# resolved from the model's registry entry).
MODEL_DEFAULT_FIELDS = tuple(f.name for f in dataclasses.fields(TrainerConfig)
                             if f.metadata.get("by_model"))


def model_sections(model: str) -> tuple[type, ...]:
  """The sections --model reads: the shared ones, then its registry entry's."""
  return SHARED_SECTIONS + tuple(SECTIONS[name] for name in registry.get(model).sections)


def model_fields(model: str) -> set[str]:
  return {name for section in model_sections(model) for name in section.__dataclass_fields__}


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

  entry = registry.get(config.model)  # ConfigError naming the choices
  if config.mode not in MODES:
    bad(f"--mode={config.mode!r}: choose from {', '.join(MODES)}")
  if config.strategy not in STRATEGIES:
    bad(f"--strategy={config.strategy!r}: choose from {', '.join(STRATEGIES)}")
  if not config.data_dir:
    bad("--data_dir is required")
  if not config.model_dir:
    bad("--model_dir is required")
  for name in ("batch_size", "emb_dim", "steps_per_loop", "log_every_steps",
               "checkpoint_every_steps", "keep_checkpoints", "eval_batch_size", "shuffle_buffer"):
    if getattr(config, name) < 1:
      bad(f"--{name}={getattr(config, name)}: must be >= 1")
  for name in ("epochs", "train_steps", "warmup_steps", "eval_every_steps", "eval_negatives",
               "eval_every_epochs", "early_stopping_patience", "eval_max_users",
               "num_cpu_replicas"):
    if getattr(config, name) < 0:
      bad(f"--{name}={getattr(config, name)}: must be >= 0")
  if config.eval_every_steps and config.eval_every_epochs:
    bad(f"--eval_every_steps={config.eval_every_steps} and --eval_every_epochs="
        f"{config.eval_every_epochs}: set one of them")
  _check_selection(config)
  if config.epochs == 0 and config.train_steps == 0:
    bad("--epochs=0 and --train_steps=0: nothing to train")
  if not 0.0 <= config.dropout < 1.0:
    bad(f"--dropout={config.dropout}: must be in [0, 1)")
  if config.learning_rate <= 0:
    bad(f"--learning_rate={config.learning_rate}: must be > 0")
  if config.weight_decay < 0:
    bad(f"--weight_decay={config.weight_decay}: must be >= 0")
  if config.lr_schedule not in LR_SCHEDULES:
    bad(f"--lr_schedule={config.lr_schedule!r}: choose from {', '.join(LR_SCHEDULES)}")
  if not config.eval_topk or min(config.eval_topk) < 1:
    bad(f"--eval_topk={','.join(map(str, config.eval_topk))}: cut-offs must be >= 1")
  for section in model_sections(config.model):
    check = getattr(section, "check", None)
    if check is not None:
      check(config)  # ConfigError naming the flag
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
  if entry.data == registry.RANKING:
    try:
      manifest = mf.load_ranking(config.data_dir)
    except DataError as e:
      bad(f"--data_dir: {e}")
    check_saved_config(config, manifest)
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
  check_saved_config(config, manifest)
  return manifest


def _check_selection(config: TrainerConfig) -> None:
  """Early-stopping flags against each other and the evaluation's metrics."""
  from contracts.metrics import metric_names  # numpy only
  if not config.selects_best:
    return
  metric = config.early_stopping_metric
  if not registry.get(config.model).has_validation_split:
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


# trainer_config.json's record of the data the model was first trained on
# (beside the config's fields): {name: {"sha256", "size"}} per vocabulary.
DATA_VOCABULARIES = "data_vocabularies"


def data_vocabularies(manifest: mf.Manifest | mf.RankingManifest) -> dict[str, dict]:
  """{name: {"sha256": of its file, "size": rows, padding included}} for the
  vocabularies a model's indices refer to: the data's identity, whatever its path."""
  from contracts.export_manifest import VOCABULARY_FILES, vocab_fingerprints
  fingerprints = vocab_fingerprints(manifest, tuple(VOCABULARY_FILES))
  return {name: {"sha256": sha, "size": int(manifest.vocab_sizes[name])}
          for name, sha in fingerprints.items()}


def check_saved_config(config: TrainerConfig,
                       manifest: mf.Manifest | mf.RankingManifest) -> None:
  """The flags against the trainer_config.json of the checkpoints already in
  model_dir, if any: the architecture and the data must be the same. The data
  is recognised by its vocabularies' SHA-256 (any path to the same data is
  accepted, changed data at the same path is not); a model_dir that recorded
  none (written before they were) by the data_dir's path."""
  path = Path(config.model_dir) / CONFIG_FILE
  if not path.is_file():
    return
  try:
    recorded = json.loads(path.read_text())
    saved = TrainerConfig.from_dict(recorded)
  except (ValueError, TypeError, AttributeError) as e:
    raise ConfigError(f"--model_dir: {path} is not a trainer config ({e})") from e
  for name in ARCHITECTURE_FIELDS:
    if config.reads(name) and getattr(saved, name) != getattr(config, name):
      raise ConfigError(
          f"--{name}={getattr(config, name)} differs from {getattr(saved, name)} of the "
          f"checkpoints in {config.model_dir} (use another --model_dir)")
  trained_on = recorded.get(DATA_VOCABULARIES)
  if not trained_on:
    if Path(saved.data_dir).absolute() != Path(config.data_dir).absolute():
      raise ConfigError(f"--data_dir={config.data_dir} differs from {saved.data_dir} the "
                        f"checkpoints in {config.model_dir} were trained on")
    return
  current = data_vocabularies(manifest)
  for name, first in trained_on.items():
    now = current.get(name)
    if now is None or now["sha256"] != first.get("sha256"):
      sizes = (f"{first.get('size', 1) - 1} {name} then, "
               f"{now['size'] - 1} now" if now else "not in this data")
      raise ConfigError(
          f"--data_dir={config.data_dir}: its {name} vocabulary differs from the one the "
          f"checkpoints in {config.model_dir} were trained on ({saved.data_dir}): {sizes} "
          "(SHA-256 differs; use another --model_dir)")


def for_evaluation(given: TrainerConfig, present: set[str]) -> TrainerConfig:
  """--mode=eval: the trained model's saved config with the evaluation flags
  the command line gave (`present`); a different architecture is refused."""
  path = Path(given.model_dir) / CONFIG_FILE
  if not given.model_dir:
    raise ConfigError("--model_dir is required")
  _check_outside_model_dir(given.eval_metrics_file, given.model_dir)
  if not path.is_file():
    raise ConfigError(f"--mode=eval: {path} does not exist (--model_dir has no trained model)")
  try:
    saved = json.loads(path.read_text())
    trained = TrainerConfig.from_dict(saved)
  except (ValueError, TypeError) as e:
    raise ConfigError(f"--model_dir: {path} is not a trainer config ({e})") from e
  for name in sorted(present & set(ARCHITECTURE_FIELDS)):
    if trained.reads(name) and getattr(given, name) != getattr(trained, name):
      raise ConfigError(f"--{name}={getattr(given, name)} differs from "
                        f"{getattr(trained, name)} of the model in {given.model_dir}")
  values = {**saved, "mode": "eval", "model_dir": given.model_dir}
  for name in present & set(EVALUATION_FIELDS):
    values[name] = getattr(given, name)
  return TrainerConfig.from_dict(values)


def _check_outside_model_dir(metrics_file: str, model_dir: str) -> None:
  """--mode=eval writes nothing into the model directory: a metrics file
  there (through a symlink or a relative path too) could replace the run's
  own metrics.json."""
  if not metrics_file:
    return
  target, model = Path(os.path.realpath(metrics_file)), Path(os.path.realpath(model_dir))
  if target == model or model in target.parents:
    raise ConfigError(f"--eval_metrics_file={metrics_file} is inside --model_dir={model_dir} "
                      f"(it resolves to {target}); --mode=eval writes nothing into the model "
                      "directory, choose a file elsewhere")


def save(config: TrainerConfig, manifest: mf.Manifest | mf.RankingManifest) -> None:
  """trainer_config.json: the config's fields and the data's vocabularies."""
  from contracts.fileio import write_json_atomic
  Path(config.model_dir).mkdir(parents=True, exist_ok=True)
  write_json_atomic(Path(config.model_dir) / CONFIG_FILE,
                    {**config.to_dict(), DATA_VOCABULARIES: data_vocabularies(manifest)})
