"""trainer: trains a retrieval model or the ranker on a preprocess output directory.

  trainer --model=sasrec --data_dir=OUT --model_dir=MODEL
  trainer --model=two_tower --data_dir=OUT --model_dir=MODEL --strategy=mirrored
  trainer --model=dien --data_dir=RANK_OUT --model_dir=RANKER   # preprocess --mode=ranking data
  trainer --flagfile=configs/ml1m_sasrec.flags
  trainer --mode=eval --model_dir=MODEL --eval_negatives=100 --eval_metrics_file=m.json

Re-running the same command resumes from the latest checkpoint. The
retrieval models evaluate the valid split every epoch, keep the best
evaluation in MODEL/checkpoints/best, stop after --early_stopping_patience
evaluations without improvement, and evaluate and export the best. Flags are
checked before TensorFlow starts; the ones used are saved in
MODEL/trainer_config.json. Outputs: MODEL/checkpoints, MODEL/summaries
(TensorBoard), MODEL/metrics.json, MODEL/export (trainer/export.py).
"""

import contextlib
import dataclasses
import functools
import os
import typing

from absl import app, flags, logging

from contracts import cli, locks
from contracts.errors import DataError
from trainer import cluster
from trainer import config as config_lib
from trainer import registry

FLAGS = flags.FLAGS


def _by_model(field: str) -> str:
  """'default: X for sasrec, ...' over the models whose defaults set the field."""
  return "default: " + ", ".join(f"{registry.get(model).defaults[field]} for {model}"
                                 for model in registry.names()
                                 if field in registry.get(model).defaults)


def _readers(section: type) -> str:
  """'sasrec, gru4rec: ' for a model section; '' for the shared ones."""
  if section in config_lib.SHARED_SECTIONS:
    return ""
  models = [m for m in registry.names() if section.__name__ in registry.get(m).sections]
  return ", ".join(models) + ": "


def _tuple_field(field: dataclasses.Field) -> bool:
  return typing.get_origin(field.type) is tuple


def define_flags() -> None:
  """One flag per TrainerConfig field: same name, type, default and choices;
  the help text is the field's, prefixed by the models that read it."""
  for field in dataclasses.fields(config_lib.TrainerConfig):
    name, meta = field.name, field.metadata
    help_text = _readers(config_lib.section_of(name)) + meta["help"]
    if meta.get("by_model"):
      help_text = f"{help_text} ({_by_model(name)})"
    default = None if field.default in (None, "") else field.default
    if name == "model":
      flags.DEFINE_enum(name, default, registry.names(), help_text)
    elif meta.get("choices"):
      flags.DEFINE_enum(name, default, list(meta["choices"]), help_text)
    elif _tuple_field(field):
      flags.DEFINE_list(name, list(map(str, default)), help_text)
    else:
      kind = typing.get_args(field.type)[0] if typing.get_args(field.type) else field.type
      define = {bool: flags.DEFINE_boolean, int: flags.DEFINE_integer,
                float: flags.DEFINE_float, str: flags.DEFINE_string}[kind]
      define(name, default, help_text)


define_flags()
# How the run is launched (not part of the saved config: any launcher resumes any run).
flags.DEFINE_enum("launcher", "process", ["process", "ray"],
                  "process: this process trains (one of the workers under multi_worker); ray: "
                  "--num_workers Ray Train workers run --strategy=multi_worker (needs the `ray` "
                  "extra).")
flags.DEFINE_integer("num_workers", 2, "--launcher=ray: training workers.")
flags.DEFINE_string("ray_address", "", "--launcher=ray: the cluster to connect to (default: "
                    "start a local one).")
flags.DEFINE_integer("cpus_per_worker", 1, "--launcher=ray: CPUs (TensorFlow threads) per "
                     "worker.")
flags.DEFINE_boolean("use_gpu", False, "--launcher=ray: one GPU per worker.")


def config_from_flags() -> config_lib.TrainerConfig:
  values = {}
  for field in config_lib.TrainerConfig.__dataclass_fields__:
    value = getattr(FLAGS, field)
    if _tuple_field(config_lib.TrainerConfig.__dataclass_fields__[field]):
      value = cli.int_tuple(value, field)
    # None keeps a model-dependent default (and jit_compile's) unresolved.
    resolved_later = field == "jit_compile" or field in config_lib.MODEL_DEFAULT_FIELDS
    values[field] = value if value is not None or resolved_later else ""
  return config_lib.TrainerConfig(**values)


fail = functools.partial(cli.fail, "trainer")


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}", 2)
  try:
    config = config_from_flags()
    _check_model_reads_the_flags(config)
    if FLAGS.launcher == "ray":
      _launch_on_ray(config)
      return
    if config.mode == "eval":
      present = {f for f in config_lib.TrainerConfig.__dataclass_fields__ if FLAGS[f].present}
      config = config_lib.for_evaluation(config, present)
    manifest = config_lib.validate(config)
  except (config_lib.ConfigError, DataError) as e:
    fail(str(e), 2 if isinstance(e, config_lib.ConfigError) else 1)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  if config.mode == "eval":
    from trainer import train_lib  # imports TensorFlow: only after the flags are known good
    try:
      evaluated = train_lib.run_evaluation(config, manifest)
    except (config_lib.ConfigError, DataError) as e:
      fail(str(e), 2 if isinstance(e, config_lib.ConfigError) else 1)
    print(evaluated)
    return
  try:
    with _model_dir_lock(config):  # before TensorFlow starts: a busy model_dir fails at once
      # Again: now no other trainer can change model_dir.
      config_lib.check_saved_config(config, manifest)
      from trainer import train_lib
      try:
        result = train_lib.train(config, manifest)
      except train_lib.TrainingError as e:
        fail(str(e), 1)
      except Exception as e:  # pylint: disable=broad-except
        reason = train_lib.storage_failure(e)
        if reason is None:
          raise
        fail(f"--model_dir={config.model_dir}: cannot write ({reason}); the last complete "
             "checkpoint is kept, and the same command resumes from it", 1)
  except locks.DirectoryLocked as e:
    fail(f"--model_dir: {e}", 1)
  except (config_lib.ConfigError, DataError) as e:
    fail(str(e), 2 if isinstance(e, config_lib.ConfigError) else 1)
  if result.interrupted:
    print(f"trainer: stopped by SIGTERM at step {result.global_step}; checkpoint saved")
  elif result.metrics is not None:
    chosen = "" if result.metrics["global_step"] == result.global_step else \
        f" (best: step {result.metrics['global_step']})"
    print(f"trainer: step {result.global_step}{chosen}, {result.headline} "
          f"({config.model_dir}/metrics.json)")


def _launch_on_ray(config: config_lib.TrainerConfig) -> None:
  """--launcher=ray: the flags checked here (all but TF_CONFIG, which Ray
  Train sets on each worker), the model_dir locked for the run, the workers
  started on the cluster."""
  if config.mode != "train":
    raise config_lib.ConfigError(f"--mode={config.mode}: --launcher=ray trains; evaluate with "
                                 "--mode=eval in one process")
  if config.strategy not in ("default", "multi_worker"):
    raise config_lib.ConfigError(f"--strategy={config.strategy}: --launcher=ray trains with "
                                 "--strategy=multi_worker")
  config = dataclasses.replace(config, strategy="multi_worker")
  manifest = config_lib.validate(dataclasses.replace(config, strategy="default"))
  from trainer import ray_launcher  # pylint: disable=import-outside-toplevel
  ray_launcher.import_ray_train()  # a missing extra is one line before anything starts
  try:
    with locks.exclusive(config.model_dir, "trainer"):
      config_lib.check_saved_config(config, manifest)
      try:
        metrics = ray_launcher.run(config, FLAGS.num_workers, FLAGS.ray_address,
                                   FLAGS.cpus_per_worker, FLAGS.use_gpu)
      except (config_lib.ConfigError, DataError):
        raise
      except Exception as e:  # pylint: disable=broad-except
        reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        fail(f"--launcher=ray: the run failed ({reason}); the same command resumes it from "
             "the last checkpoint", 1)
  except locks.DirectoryLocked as e:
    fail(f"--model_dir: {e}", 1)
  print(f"trainer: step {metrics['global_step']} on {FLAGS.num_workers} Ray workers "
        f"({config.model_dir}/metrics.json)")


def _check_model_reads_the_flags(config: config_lib.TrainerConfig) -> None:
  """--tower_units with dien is an error pointing at --mlp_units, dien's top
  MLP (the names invite the mix-up). Other flags a model does not read are
  allowed, so one flagfile can serve several models."""
  if config.model == "dien" and FLAGS["tower_units"].present:
    raise config_lib.ConfigError("--tower_units: dien's top MLP is --mlp_units "
                                 "(--tower_units sets the two_tower towers)")


def _model_dir_lock(config: config_lib.TrainerConfig):
  """The model_dir's lock for the run, taken by the process that writes it: the
  only one, or the chief of a multi-worker job (the other workers write into
  their own worker_tmp/ and share the chief's job, not a lock of their own)."""
  if config.strategy == "multi_worker" and not cluster.from_environment().is_chief:
    return contextlib.nullcontext()
  return locks.exclusive(config.model_dir, "trainer")


def run():
  logging.set_verbosity(logging.INFO)
  app.run(main)


if __name__ == "__main__":
  run()
