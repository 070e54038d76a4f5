"""Every trainer flag's values, tried on tiny data over every model that reads it.

The matrix is built from trainer/config.py: every TrainerConfig field (one
flag each) that a model reads (its registry sections) is tried with each
value of its MATRIX entry that differs from the model's base run (conftest's
small config); a boolean needs no entry (both values are tried), nor does a
field with choices (every choice). A field with neither an entry nor a reason
in NOT_VARIED fails `test_every_trainer_flag_has_a_matrix_entry`, so a new
flag cannot ship untried.

Settings are packed into few runs, not one run each: for each model they are
merged greedily into the first run that `config.validate` still accepts
(flags that refuse each other, e.g. --symmetric_loss with --loss=softmax, go
to separate runs). Each run trains a few steps in-process, evaluates and,
where it says so, exports and re-evaluates with --mode=eval.
"""

import dataclasses
import json
import math
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from conftest import small_trainer_config
from contracts.errors import ConfigError
from contracts.export_manifest import EXPORT_DIR, EXPORT_MANIFEST
from trainer import config as config_lib
from trainer import registry

# field -> the settings a run must try. A setting is a value of the field, or a
# dict of flags that go together (the value means nothing without the others).
# Booleans (both values) and fields with choices (every choice) are derived.
MATRIX = {
    # --mode=eval re-evaluates the run's model directory after training (the
    # eval-only flags ride with it).
    "mode": [{"mode": "eval", "eval_checkpoint": "latest",
              "eval_metrics_file": "{model_dir}_eval_metrics.json"}],
    "eval_checkpoint": [{"mode": "eval", "eval_checkpoint": "latest",
                         "eval_metrics_file": "{model_dir}_eval_metrics.json"}],
    "eval_metrics_file": [{"mode": "eval", "eval_checkpoint": "latest",
                           "eval_metrics_file": "{model_dir}_eval_metrics.json"}],
    "strategy": ["one_device", {"strategy": "mirrored", "num_cpu_replicas": 2}],
    "num_cpu_replicas": [{"strategy": "mirrored", "num_cpu_replicas": 2}],
    "seed": [7],
    "batch_size": [16],
    "epochs": [{"epochs": 1, "train_steps": 0, "batch_size": 128}],
    "train_steps": [4],
    "learning_rate": [5e-3],
    "warmup_steps": [0],
    "weight_decay": [0.0, 0.5],
    "shuffle_buffer": [1],
    "emb_dim": [16],
    "dropout": [0.0, 0.3],
    "temperature": [0.2],
    "num_sampled": [{"loss": "sampled_softmax", "num_sampled": 20}],
    "sampler": [{"loss": "sampled_softmax", "num_sampled": 20, "sampler": "popularity"}],
    "symmetric_loss": [False, {"loss": "in_batch", "symmetric_loss": True}],
    # Off matters only when a second replica has negatives to give.
    "cross_replica_negatives": [True, {"loss": "in_batch", "cross_replica_negatives": False,
                                       "strategy": "mirrored", "num_cpu_replicas": 2}],
    "remove_accidental_hits": [True, {"loss": "in_batch", "remove_accidental_hits": False}],
    "logq_correction": [True, {"loss": "in_batch", "logq_correction": False}],
    "num_negatives": [{"loss": "in_batch", "num_negatives": 8}],
    "num_blocks": [2],
    "item_dropout": [0.0],
    "num_heads": [2],
    "ff_dim": [16],
    "tower_units": [(16, 8)],
    "gru_units": [8],
    "aux_loss_weight": [0.0, 0.5],
    "mlp_units": [(16,)],
    "rank_eval_topk": [(3,)],
    "steps_per_loop": [1],
    "log_every_steps": [1],
    "checkpoint_every_steps": [3],
    "keep_checkpoints": [1],
    "eval_every_steps": [2],
    "eval_every_epochs": [0, {"eval_every_epochs": 1, "epochs": 1, "train_steps": 0,
                              "batch_size": 128}],
    "early_stopping_metric": ["", {"early_stopping_metric": "hit_rate@5", "eval_every_steps": 2,
                                   "eval_max_users": 30}],
    "early_stopping_patience": [{"early_stopping_metric": "hit_rate@5", "eval_every_steps": 2,
                                 "eval_max_users": 30, "early_stopping_patience": 1}],
    "eval_topk": [(5, 10)],
    "eval_negatives": [20],
    "eval_batch_size": [64],
    "eval_max_users": [{"eval_max_users": 30, "eval_every_steps": 2}],
}
# Fields no run varies, and why.
NOT_VARIED = {
    "model": "every registered model gets its own runs",
    "data_dir": "a path every run sets (the model's tiny data)",
    "model_dir": "a path every run sets (a new directory per run)",
}
# Values no in-process run can try, and where they are tested.
NOT_TRIED = {
    ("strategy", "multi_worker"): "a process per worker: tests/test_multi_worker.py",
}
# (field, model) pairs left out, and why.
NOT_FOR_MODEL = {
    ("early_stopping_metric", "dien"): "refused: ranking data hold out test lists only, no "
                                       "validation split to select on (tests/test_selection.py)",
    ("early_stopping_patience", "dien"): "selection flag (see early_stopping_metric)",
}
# trainer.main's flags beyond TrainerConfig: the Ray launcher's.
LAUNCHER_FLAGS = {
    name: "the Ray launcher starts worker processes: tests/test_trainer_ray.py"
    for name in ("launcher", "num_workers", "ray_address", "cpus_per_worker", "use_gpu")}
# Fields only --mode=eval reads: applied after training, left out of the training run.
EVAL_ONLY = ("mode", "eval_checkpoint", "eval_metrics_file")
MODEL_DATA = {"sasrec": "tiny_windows", "gru4rec": "tiny_windows", "two_tower": "tiny_windows",
              "dien": "tiny_ranking"}
# What every run starts from (export and selection are settings of their own).
BASE = {"export": False, "early_stopping_metric": ""}
DIEN_BASE = {"emb_dim": 8, "gru_units": 8, "mlp_units": (16,), "batch_size": 32,
             "rank_eval_topk": (5, 10)}

FIELDS = {f.name: f for f in dataclasses.fields(config_lib.TrainerConfig)}


def _is_bool(field: dataclasses.Field) -> bool:
  return field.type is bool or set(typing.get_args(field.type)) == {bool, type(None)}


def settings_of(name: str) -> list[dict]:
  """The settings of field `name`, each as a dict of flags."""
  field = FIELDS[name]
  if name in MATRIX:
    values = MATRIX[name]
  elif _is_bool(field):
    values = [True, False]
  elif field.metadata.get("choices"):
    values = list(field.metadata["choices"])
  else:
    raise KeyError(name)
  settings = [v if isinstance(v, dict) else {name: v} for v in values]
  return [s for s in settings if (name, s[name]) not in NOT_TRIED]


def run_config(model, data_dir, model_dir, overrides) -> config_lib.TrainerConfig:
  """The training config of a run: conftest's small model, BASE, the run's settings."""
  base = {**BASE, **(DIEN_BASE if model == "dien" else {})}
  values = {**base, **{k: v for k, v in overrides.items() if k not in EVAL_ONLY}}
  return small_trainer_config(data_dir, model_dir, model=model, **values)


def required_settings(model: str) -> list[dict]:
  """Every setting `model` must try, each once, in field order: the ones whose
  value is not what every run of the model has anyway (its base config)."""
  base = run_config(model, "", "", {})
  out = []
  for name in FIELDS:
    if name in NOT_VARIED or (name, model) in NOT_FOR_MODEL:
      continue
    if name in config_lib.model_fields(model):
      out += [s for s in settings_of(name) if s[name] != getattr(base, name) and s not in out]
  return out


def _trainer_main_flag_names() -> set[str]:
  """The flags trainer.main defines, read in a fresh process: another test
  module may have defined flags of the same name (tools' --data_dir) in this one."""
  code = ("import json; from absl import flags; from trainer import main; "
          "print(json.dumps([f.name for f in flags.FLAGS.get_flags_for_module('trainer.main')]))")
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        check=True, timeout=300)
  return set(json.loads(done.stdout.strip().splitlines()[-1]))


def test_every_trainer_flag_has_a_matrix_entry():
  missing = []
  for name, field in FIELDS.items():
    if name in NOT_VARIED:
      continue
    try:
      settings_of(name)
    except KeyError:
      missing.append(name)
  assert not missing, (f"trainer flags without a flag-matrix entry: {missing}; add their "
                       "values to MATRIX in tests/test_flag_matrix.py")
  assert not set(MATRIX) - set(FIELDS), "MATRIX names fields TrainerConfig no longer has"
  defined = _trainer_main_flag_names()
  assert defined - set(FIELDS) == set(LAUNCHER_FLAGS), \
      "trainer.main has flags that are neither TrainerConfig fields nor launcher flags"
  # Every choice but the default is tried or excused; the matrix covers every model.
  for name, field in FIELDS.items():
    tried = {s[name] for s in settings_of(name)} if name not in NOT_VARIED else set()
    for choice in set(field.metadata.get("choices") or ()) - {field.default}:
      assert choice in tried or (name, choice) in NOT_TRIED, (name, choice)
  assert set(MODEL_DATA) == set(registry.names())


def plan_runs(model: str, manifest, root) -> list[dict]:
  """The settings of `model` packed into as few valid runs as the greedy order allows."""
  def valid(overrides):
    try:
      config_lib.validate(run_config(model, manifest.data_dir, root / "planning", overrides))
    except ConfigError:
      return False
    return True

  runs: list[dict] = []
  for setting in required_settings(model):
    for run in runs:
      clash = any(k in run and run[k] != v for k, v in setting.items())
      if not clash and valid({**run, **setting}):
        run.update(setting)
        break
    else:
      assert valid(setting), f"{model}: the setting {setting} is refused on its own"
      runs.append(dict(setting))
  return runs


def execute(model: str, manifest, model_dir, overrides: dict) -> None:
  from trainer import train_lib
  overrides = {k: v.format(model_dir=model_dir) if isinstance(v, str) else v
               for k, v in overrides.items()}
  config = run_config(model, manifest.data_dir, model_dir, overrides)
  result = train_lib.train(config, config_lib.validate(config))
  assert not result.interrupted and result.global_step >= 1
  metric = "auc" if model == "dien" else f"ndcg@{config.eval_topk[0]}"
  assert math.isfinite(result.metrics[metric])
  assert (model_dir / EXPORT_DIR / EXPORT_MANIFEST).is_file() == config.export
  if overrides.get("mode") == "eval":
    given = dataclasses.replace(config, **{k: overrides[k] for k in EVAL_ONLY})
    evaluation = config_lib.for_evaluation(given, set(EVAL_ONLY))
    train_lib.run_evaluation(evaluation, config_lib.validate(evaluation))
    evaluated = json.loads(Path(f"{model_dir}_eval_metrics.json").read_text())
    assert evaluated["global_step"] == result.global_step  # latest
    if result.metrics["global_step"] == result.global_step:  # selection kept the latest
      assert evaluated[metric] == pytest.approx(result.metrics[metric], abs=1e-6)
    assert math.isfinite(evaluated[metric])


@pytest.mark.parametrize("model", list(MODEL_DATA))
@pytest.mark.slow
def test_every_flag_value_trains_evaluates_and_exports(request, tmp_path, model):
  manifest = request.getfixturevalue(MODEL_DATA[model])
  runs = plan_runs(model, manifest, tmp_path)
  # Coverage: every required setting holds in the resolved config of some run.
  configs = [run_config(model, manifest.data_dir, tmp_path, run) for run in runs]
  for setting in required_settings(model):
    assert any(all((run.get(k) if k in EVAL_ONLY else getattr(config, k)) == v
                   for k, v in setting.items())
               for run, config in zip(runs, configs)), (model, setting)
  for i, run in enumerate(runs):
    try:
      execute(model, manifest, tmp_path / f"run_{i}", run)
    except Exception as e:
      raise AssertionError(f"{model} run {i} with {run} failed: {e}") from e
