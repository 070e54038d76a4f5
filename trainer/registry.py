"""Model name -> what the trainer needs to build, train, evaluate and export it.

The train loop, the evaluation and the export ask the model's entry and its
Task class (trainer/task.py); nothing else in the trainer tests a model's
name. An entry names its classes as "module:Class" strings, imported when
the model is built, so flags are checked against an entry (defaults, data
kind, the config sections whose checks apply) before TensorFlow starts.

Adding a model: write its Keras model and, if its loss or data differ from
an existing one, its Task; then add one `register(ModelEntry(...))` below
(docs/extending.md walks through it).
"""

import dataclasses
import importlib
from collections.abc import Mapping
from typing import Any

from contracts.errors import ConfigError

# The two data contracts a model trains on (contracts/manifest.py).
SEQUENCES = "sequences"  # preprocess's default output: histories and next-item targets
RANKING = "ranking"  # preprocess --mode=ranking: (user, candidate) examples with labels


@dataclasses.dataclass(frozen=True)
class ModelEntry:
  name: str
  model_class: str  # "module:Class" of the Keras model
  task_class: str  # "module:Class" of its Task: loss, evaluator, final evaluation, export
  data: str  # SEQUENCES or RANKING
  # The config sections (trainer/config.py SECTIONS) the model reads beside the
  # shared ones; their checks run for this model, and their fields are its flags.
  sections: tuple[str, ...]
  # The value of every field, of the shared sections and the model's, whose
  # default depends on the model (MODEL_DEFAULT_FIELDS).
  defaults: Mapping[str, Any]
  jit_compile: bool = True  # XLA for the forward pass unless --jit_compile says otherwise

  @property
  def has_validation_split(self) -> bool:
    """Ranking data hold out lists for testing only, so there is nothing to select on."""
    return self.data == SEQUENCES

  def load_model_class(self) -> type:
    return _load(self.model_class)

  def load_task_class(self) -> type:
    return _load(self.task_class)


_ENTRIES: dict[str, ModelEntry] = {}


def register(entry: ModelEntry) -> ModelEntry:
  if entry.name in _ENTRIES:
    raise ValueError(f"model {entry.name!r} is registered twice")
  if entry.data not in (SEQUENCES, RANKING):
    raise ValueError(f"model {entry.name!r}: data must be {SEQUENCES!r} or {RANKING!r}")
  _ENTRIES[entry.name] = entry
  return entry


def names() -> tuple[str, ...]:
  return tuple(_ENTRIES)


def get(name: str) -> ModelEntry:
  if name not in _ENTRIES:
    raise ConfigError(f"--model={name!r}: choose from {', '.join(_ENTRIES)}")
  return _ENTRIES[name]


def _load(path: str) -> type:
  module, _, attribute = path.partition(":")
  return getattr(importlib.import_module(module), attribute)


# Model selection for the retrieval models: evaluate the valid split every
# epoch, export the best evaluation, stop after `early_stopping_patience`
# evaluations without improvement.
_SELECT_ON_VALID = {"early_stopping_metric": "ndcg@10", "eval_every_epochs": 1,
                    "early_stopping_patience": 10}
_RETRIEVAL_SECTIONS = ("RetrievalLossConfig",)

# sasrec's defaults are the sparse, short-sequence recipe (configs/beauty_sasrec.flags,
# chosen on Beauty's validation split, confirmed unchanged on Yelp;
# BUILD_NOTES.md, "Model selection on sparse logs"): with early stopping a
# constant rate of 1e-3 and dropout 0.2 win, temperature 0.05 converges
# sooner than 0.1, weight decay 1.0 beat 0 and 3.0, 128 dimensions beat 64
# and 256. Dense logs with long histories (ML-1M) set their own recipe.
register(ModelEntry(
    name="sasrec", model_class="trainer.models:SASRec", task_class="trainer.task:RetrievalTask",
    data=SEQUENCES,
    sections=_RETRIEVAL_SECTIONS + ("SequenceEncoderConfig", "SASRecConfig"),
    defaults={"loss": "auto", "dropout": 0.2, "learning_rate": 1e-3, "lr_schedule": "constant",
              "temperature": 0.05, "weight_decay": 1.0, "epochs": 200, "emb_dim": 128,
              "ff_dim": 256, **_SELECT_ON_VALID}))
# GRU4Rec: the classic recurrent baseline, trained like sasrec (its sparse
# recipe's optimisation and selection), the GRU as wide as the embedding;
# temperature 0.07 beat 0.05 and 0.1 on Beauty's validation split
# (configs/beauty_gru4rec.flags).
# No XLA by default: --jit_compile has to unroll the GRU (trainer/gru4rec.py),
# since the gradient of Keras' GRU loop passes a TensorList across the XLA
# boundary, which TensorFlow does not implement.
register(ModelEntry(
    name="gru4rec", model_class="trainer.gru4rec:GRU4Rec",
    task_class="trainer.task:RetrievalTask", data=SEQUENCES, jit_compile=False,
    sections=_RETRIEVAL_SECTIONS + ("SequenceEncoderConfig",),
    defaults={"loss": "auto", "dropout": 0.2, "learning_rate": 1e-3, "lr_schedule": "constant",
              "temperature": 0.07, "weight_decay": 1.0, "epochs": 200, "emb_dim": 128,
              **_SELECT_ON_VALID}))
# two_tower keeps what it was measured with.
register(ModelEntry(
    name="two_tower", model_class="trainer.models:TwoTower",
    task_class="trainer.task:RetrievalTask", data=SEQUENCES,
    sections=_RETRIEVAL_SECTIONS + ("TwoTowerConfig",),
    defaults={"loss": "auto", "dropout": 0.0, "learning_rate": 2e-3, "lr_schedule": "cosine",
              "temperature": 0.05, "weight_decay": 0.0, "epochs": 20, "emb_dim": 64,
              **_SELECT_ON_VALID}))
# The ranker: its ablation's settings; its held-out lists are its test data,
# so it keeps the last step. Its unrolled GRUs ran 1.4x slower under XLA on
# CPU, after a 45 s compile (BUILD_NOTES.md).
register(ModelEntry(
    name="dien", model_class="trainer.dien:DIEN", task_class="trainer.task:RankingTask",
    data=RANKING, jit_compile=False, sections=("DIENConfig",),
    defaults={"dropout": 0.2, "learning_rate": 1e-3, "lr_schedule": "constant",
              "weight_decay": 0.0, "epochs": 20, "emb_dim": 64, "early_stopping_metric": "",
              "eval_every_epochs": 0, "early_stopping_patience": 0}))
