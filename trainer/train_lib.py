"""The training loop: strategy, checkpoints, exact resume, evaluation, export.

A custom loop over `strategy.run`, `steps_per_loop` steps per tf.function
call (Model Garden / Orbit style). Around it:

* Checkpoints (`tf.train.CheckpointManager`) every --checkpoint_every_steps
  and at the end hold the model and the optimizer (its iteration counter is
  the global step); dropout masks and negative pools are functions of (seed,
  step, replica), so a re-run of the same command
  resumes at the exact batch: the input stream is a pure function of (seed,
  epoch) and is skipped to the restored step (input_pipeline.py).
* SIGTERM finishes the current loop, saves a checkpoint and returns
  normally (exit 0). A NaN/Inf loss raises TrainingError before anything is
  saved, so the last good checkpoint stays the latest.
* Model selection (trainer/selection.py): with --early_stopping_metric the
  valid split is evaluated every --eval_every_epochs (a checkpoint first, so
  a resume repeats the decisions), the best evaluation's weights are kept in
  checkpoints/best, training stops after --early_stopping_patience
  evaluations without improvement, and the best weights are what the final
  evaluation and the export use. The chief evaluates and decides; under
  multi_worker a collective hands its decision to every worker.
* Progress lines with examples/s; TensorBoard scalars (loss, learning rate,
  examples/s, eval metrics) in model_dir/summaries.
* Keras 3 trap: the optimizer is built inside strategy.scope() before the
  first step, else the step fails on a placeholder.
"""

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path

import keras
import tensorflow as tf
from absl import logging

from contracts import manifest as mf
from contracts.errors import DataError
from contracts.fileio import os_error_reason, remove_path, write_json_atomic
from contracts.model_layout import CHECKPOINT_DIR, METRICS_FILE
from trainer import cluster
from trainer import config as config_lib
from trainer import checkpoints, input_pipeline, precision, registry, selection, strategies
from trainer.config import TrainerConfig

WORKER_TMP_DIR = "worker_tmp"  # non-chief workers' checkpoints, removed at the end
TRAIN_SUMMARIES = Path("summaries") / "train"  # under model_dir: loss, learning_rate, examples/s
EVAL_SUMMARIES = Path("summaries") / "eval"  # every evaluation's metrics
NO_WEIGHT_DECAY = ("bias", "gamma", "beta")  # variable names --weight_decay leaves alone


# What a collective raises when a peer process dies (connection reset), hangs
# (TensorFlow's coordination service misses its heartbeats for ~10 s) or
# cannot be reached.
PEER_FAILURES = (tf.errors.UnavailableError, tf.errors.AbortedError,
                 tf.errors.DeadlineExceededError)


class TrainingError(RuntimeError):
  """Training cannot continue (e.g. a non-finite loss); the message says why."""


# What the operating system says when storage refuses a write; TensorFlow's
# file ops carry it only in their message.
STORAGE_FAILURES = ("No space left on device", "Disk quota exceeded", "Read-only file system",
                    "Permission denied", "Input/output error")


def storage_failure(error: BaseException) -> str | None:
  """The storage reason when `error` is a failed write or read of a file
  (Python's OSError or a TensorFlow file op), else None."""
  if isinstance(error, OSError):
    return os_error_reason(error)
  if isinstance(error, tf.errors.OpError):
    return next((reason for reason in STORAGE_FAILURES if reason in error.message), None)
  return None


@dataclasses.dataclass
class RunResult:
  global_step: int  # steps trained
  interrupted: bool
  metrics: dict | None  # its "global_step" is the step evaluated and exported (the best)
  headline: str = ""  # the final evaluation in one line


class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
  """Linear warm-up to `peak`, then constant or cosine decay to 0 at `total_steps`."""

  def __init__(self, peak: float, warmup_steps: int, total_steps: int, kind: str):
    self.peak, self.warmup_steps = peak, warmup_steps
    self.total_steps, self.kind = total_steps, kind

  def __call__(self, step):
    step = tf.cast(step, tf.float32)
    warmup = tf.cast(max(self.warmup_steps, 1), tf.float32)
    rate = self.peak * tf.minimum(1.0, (step + 1.0) / warmup)
    if self.kind == "cosine":
      span = tf.cast(max(self.total_steps - self.warmup_steps, 1), tf.float32)
      progress = tf.clip_by_value((step - self.warmup_steps) / span, 0.0, 1.0)
      rate = tf.where(step < self.warmup_steps, rate,
                      self.peak * 0.5 * (1.0 + tf.cos(math.pi * progress)))
    return rate

  def get_config(self):
    return {"peak": self.peak, "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps, "kind": self.kind}


def set_random_seeds(seed: int) -> None:
  """Python's, numpy's and TensorFlow's global seeds from --seed.

  tf.data looks a tensor op seed up by comparing (global, op) with (0, 0) in
  Python, which fails while tracing when the global seed is 0 (mod 2**31 - 1),
  so the per-epoch shuffles of TrainReader could not be built for those
  seeds; TensorFlow gets the next seed instead.
  """
  keras.utils.set_random_seed(seed)
  if seed % (2**31 - 1) == 0:
    tf.random.set_seed(seed + 1)


def task_class(config: TrainerConfig) -> type:
  """The Task class of --model (trainer/registry.py)."""
  return registry.get(config.model).load_task_class()


def build_model(config: TrainerConfig, manifest):
  """The model of --model with its variables created (call inside the strategy scope)."""
  entry = registry.get(config.model)
  with precision.policy_scope(precision.policy_name(config.mixed_precision)):
    return entry.load_task_class().build_model(config, manifest, entry.load_model_class())


class _StopFlag:
  """Set by SIGTERM; the loop checks it between tf.function calls."""

  def __init__(self):
    self.requested = False

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class Trainer:
  """Builds everything for one config; `run()` trains, evaluates, exports."""

  def __init__(self, config: TrainerConfig, manifest: mf.Manifest):
    self.config, self.manifest = config, manifest
    self.model_dir = Path(config.model_dir)
    set_random_seeds(config.seed)
    self.strategy = strategies.create(config)
    replicas = self.strategy.num_replicas_in_sync
    if config.batch_size % replicas:
      raise config_lib.ConfigError(
          f"--batch_size={config.batch_size} is not divisible by the {replicas} replicas")
    # One input pipeline per worker process; only the chief writes final paths.
    self.cluster = cluster.from_environment() if config.strategy == "multi_worker" else None
    self.num_pipelines = self.cluster.num_workers if self.cluster else 1
    self.is_chief = self.cluster is None or self.cluster.is_chief
    self.steps_per_epoch = input_pipeline.steps_per_epoch(manifest, config.batch_size, replicas,
                                                          self.num_pipelines)
    self.total_steps = config.train_steps or config.epochs * self.steps_per_epoch
    with self.strategy.scope():
      self.model = build_model(config, manifest)
      schedule = WarmupSchedule(config.learning_rate, config.warmup_steps, self.total_steps,
                                config.lr_schedule)
      optimizer = keras.optimizers.Adam(learning_rate=schedule,
                                        weight_decay=config.weight_decay or None)
      if config.weight_decay:
        # Decaying a LayerNorm scale or a bias toward 0 is not a prior anyone wants.
        optimizer.exclude_from_weight_decay(var_names=list(NO_WEIGHT_DECAY))
      if precision.needs_loss_scale(precision.policy_name(config.mixed_precision)):
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
      self.optimizer = optimizer
      self.optimizer.build(self.model.trainable_variables)
    self.task = task_class(config)(config, manifest, self.model)
    # No RNG state to save: dropout masks and negative pools are functions of
    # (seed, step, replica) (models.SeededDropout).
    self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer)
    self.manager = self._checkpoint_manager()
    self._eval_writer = None
    self._broadcast = None  # _agree's collective, built on first use

  def _checkpoint_manager(self) -> tf.train.CheckpointManager:
    checkpoint_dir = self.model_dir / CHECKPOINT_DIR
    if not self.is_chief:  # other workers write where nobody reads (TF's documented pattern)
      checkpoint_dir = self._worker_tmp_dir()
    return tf.train.CheckpointManager(self.checkpoint, str(checkpoint_dir),
                                      max_to_keep=self.config.keep_checkpoints)

  def _worker_tmp_dir(self) -> Path:
    return self.model_dir / WORKER_TMP_DIR / self.cluster.worker_name

  @property
  def global_step(self) -> int:
    return int(self.optimizer.iterations.numpy())

  def restore(self) -> int:
    """Restores the newest intact checkpoint of model_dir; its step.

    Every worker restores the chief's checkpoint (a non-chief's own
    worker_tmp/ copy outlives a crash and may be from another step) and
    picks it the same way: each reads the same files. A damaged newer one
    is skipped with one log line; the chief then rewrites the state file
    without it, so the next save at that step replaces it.
    """
    found = checkpoints.newest_intact(self.checkpoint_dir)
    listing = found.listing
    if listing.recovered:
      if not listing.prefixes:
        raise TrainingError(f"{listing.recovered}, and no ckpt-N.index file is beside it; "
                            "remove it to train from step 0")
      logging.info("%s; recovered the checkpoint list from the ckpt-N.index files: %s",
                   listing.recovered, ", ".join(Path(p).name for p in listing.prefixes))
    if found.prefix is None:
      if found.damaged:
        raise TrainingError(f"no intact checkpoint to resume from: {found.describe_damage()}; "
                            f"move {self.checkpoint_dir} away to train from step 0")
      return self.global_step
    if found.damaged:
      logging.info("%s; resuming from %s instead", found.describe_damage(), found.prefix)
    if self.is_chief and (listing.recovered or found.damaged):
      checkpoints.write_state(self.checkpoint_dir, found.intact)
      self.manager = self._checkpoint_manager()  # it reads the list back
    self.checkpoint.restore(found.prefix).assert_existing_objects_matched()
    logging.info("resumed from %s at step %d", found.prefix, self.global_step)
    return self.global_step

  def _train_loop_function(self):
    model, optimizer, task, strategy = self.model, self.optimizer, self.task, self.strategy
    variables = model.trainable_variables
    scale = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)

    # XLA compiles the task's forward pass (and so its gradient), not its
    # loss: the loss gathers a data-dependent number of rows and runs
    # collectives, which a nested XLA function cannot (see task.py).
    forward = task.forward
    if self.config.use_xla:
      forward = tf.function(forward, jit_compile=True)

    def forward_backward(batch):
      step = tf.convert_to_tensor(optimizer.iterations)  # a tensor argument, not a variable
      with tf.GradientTape() as tape:
        loss = task.loss(forward(batch, training=True, step=step), step)
        scaled = optimizer.scale_loss(loss) if scale else loss
      return loss, tape.gradient(scaled, variables)

    def replica_step(batch):
      loss, grads = forward_backward(batch)
      optimizer.apply_gradients(zip(grads, variables))
      return loss

    @tf.function
    def train_loop(iterator, num_steps):
      total = tf.constant(0.0, tf.float32)
      for _ in tf.range(num_steps):
        losses = strategy.run(replica_step, args=(next(iterator),))
        # Each replica returns its share of the global mean: the sum is the mean.
        total += strategy.reduce(tf.distribute.ReduceOp.SUM, losses, axis=None)
      return total / tf.cast(num_steps, tf.float32)

    return train_loop

  def _evaluator(self, max_users: int, split: str | None = None):
    return make_evaluator(self.config, self.manifest, max_users, split)

  @property
  def checkpoint_dir(self) -> Path:
    return self.model_dir / CHECKPOINT_DIR

  def _is_evaluation_step(self, step: int) -> bool:
    """A periodic evaluation follows this step (with selection: the last step too)."""
    interval = self.config.eval_interval_steps(self.steps_per_epoch)
    if not interval or step <= 0:
      return False
    if step == self.total_steps:
      return self.config.selects_best
    return step % interval == 0

  def _load_selection(self, step: int) -> selection.Selection:
    c = self.config
    chosen = selection.load(self.checkpoint_dir, c.early_stopping_metric,
                            config_lib.SELECTION_SPLIT, c.early_stopping_patience, step)
    best, kept = chosen.best(), selection.read_best(self.checkpoint_dir)
    if best is not None and (kept is None or kept["step"] != best["step"]):
      if kept is not None and kept["step"] > step:
        # Resumed before a damaged checkpoint: the evaluations after `step` are
        # repeated, take the same decisions and write best/ again (checked at the end).
        logging.info("%s names step %d, after the restored step %d: the evaluations from "
                     "there are repeated", selection.best_file(self.checkpoint_dir),
                     kept["step"], step)
      else:
        raise TrainingError(self._best_mismatch(kept, best))
    if chosen.curve and best is not None:
      logging.info("selection on %s %s: %d evaluations up to step %d, best %.4f at step %d",
                   chosen.split, chosen.metric, len(chosen.curve), step, best[chosen.metric],
                   best["step"])
    return chosen

  def _best_mismatch(self, kept: dict | None, best: dict) -> str:
    return (f"{selection.best_file(self.checkpoint_dir)} names step "
            f"{kept and kept['step']}, but the validation curve's best is step {best['step']}; "
            "the model directory was changed by hand, use another --model_dir")

  def _select(self, evaluator, chosen: selection.Selection, step: int) -> None:
    """Evaluates the valid split at `step`, keeps the weights if they are the best."""
    result = self._log_eval(evaluator, evaluator.evaluate(self.model), step)
    entry = {"step": step, "epoch": round(step / self.steps_per_epoch, 4),
             **{k: v for k, v in result.items() if isinstance(v, float)}}
    if chosen.add(entry):
      self._save_best(entry)
    chosen.save(self.checkpoint_dir)  # after best/: see trainer/selection.py
    best = chosen.best()
    logging.info("selection at step %d: %s %.4f; best %.4f at step %d, %d of %s evaluations "
                 "without improvement", step, chosen.metric, entry[chosen.metric],
                 best[chosen.metric], best["step"], chosen.evaluations_since_best(),
                 chosen.patience or "unlimited")

  def _save_best(self, entry: dict) -> None:
    best_dir = self.checkpoint_dir / selection.BEST_DIR
    name = f"ckpt-{entry['step']}"
    tf.train.Checkpoint(model=self.model).write(str(best_dir / name))
    write_json_atomic(selection.best_file(self.checkpoint_dir),
                      {"step": entry["step"], "epoch": entry["epoch"],
                       "metric": self.config.early_stopping_metric,
                       "value": entry[self.config.early_stopping_metric], "checkpoint": name})
    for path in best_dir.glob("ckpt-*"):  # the previous best
      if not path.name.startswith(name + "."):
        path.unlink(missing_ok=True)

  def _restore_best(self, best: dict) -> None:
    prefix = selection.best_prefix(self.checkpoint_dir, best)
    try:
      checkpoints.verify(str(prefix))
    except checkpoints.DamagedCheckpoint as e:
      raise TrainingError(f"the best evaluation's checkpoint (step {best['step']}): {e}") from e
    tf.train.Checkpoint(model=self.model).read(str(prefix)).assert_consumed()
    logging.info("restored the best evaluation, step %d (%s %.4f), from %s", best["step"],
                 best["metric"], best["value"], prefix)

  def _agree(self, chief_decision: bool) -> bool:
    """The chief's decision, on every worker (one collective under multi_worker)."""
    if self.cluster is None:
      return chief_decision
    if self._broadcast is None:
      strategy = self.strategy
      local_replicas = len(strategy.extended.worker_devices)

      @tf.function
      def broadcast(value):
        # Each of the chief's replicas adds value / local replicas, the others 0.
        per_replica = strategy.run(lambda: value / local_replicas)
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

      self._broadcast = broadcast
    value = 1.0 if self.is_chief and chief_decision else 0.0
    return float(self._broadcast(tf.constant(value, tf.float32))) > 0.5

  def _periodic_evaluation(self, step: int, evaluator, chosen: selection.Selection | None) -> bool:
    """The evaluation after `step`; True when selection says stop here. Every
    worker calls it (the stop decision is a collective); only the chief,
    which has the evaluator, evaluates."""
    if self.config.selects_best:
      if chosen is not None:
        self._select(evaluator, chosen, step)
      return self._agree(chosen is not None and chosen.exhausted)
    if evaluator is not None and step < self.total_steps:  # the end evaluates anyway
      self._log_eval(evaluator, evaluator.evaluate(self.model), step)
    return False

  def run(self) -> RunResult:
    c = self.config
    if self.is_chief:
      remove_leftovers(self.model_dir)
    step = self.restore()
    if self.is_chief:
      config_lib.save(c, self.manifest)
    if step >= self.total_steps:
      logging.info("already trained %d >= %d steps", step, self.total_steps)
    reader = input_pipeline.TrainReader(self.manifest, c.batch_size, c.seed, self.steps_per_epoch,
                                        start_step=step, shuffle_buffer=c.shuffle_buffer)
    dataset = self.strategy.distribute_datasets_from_function(reader)
    iterator = iter(dataset)
    train_loop = self._train_loop_function()
    writer = tf.summary.create_file_writer(str(self.model_dir / TRAIN_SUMMARIES)) \
        if self.is_chief else tf.summary.create_noop_writer()
    interval = c.eval_interval_steps(self.steps_per_epoch)
    periodic_eval = None
    if interval and self.is_chief:
      periodic_eval = self._evaluator(
          c.eval_max_users, config_lib.SELECTION_SPLIT if c.selects_best else None)
    chosen = self._load_selection(step) if c.selects_best and self.is_chief else None
    stopped_early = False
    if c.selects_best:
      # A run killed after an evaluation step's checkpoint, before its
      # evaluation, evaluates it now; a finished selection trains no further.
      pending = chosen is not None and self._is_evaluation_step(step) and not chosen.has(step)
      if pending:
        self._select(periodic_eval, chosen, step)
      stopped_early = self._agree(chosen is not None and chosen.exhausted)
    logging.info("training %s: %d steps (%d per epoch), global batch %d on %d replicas%s",
                 c.model, self.total_steps, self.steps_per_epoch, c.batch_size,
                 self.strategy.num_replicas_in_sync,
                 self.task.describe(c, self.manifest))
    interrupted = False
    train_started = time.perf_counter()
    window_start, window_steps, window_loss = time.perf_counter(), 0, 0.0
    with _StopFlag() as stop:
      while step < self.total_steps and not stopped_early:
        boundaries = [self.total_steps, _next_multiple(step, c.steps_per_loop),
                      _next_multiple(step, c.checkpoint_every_steps),
                      _next_multiple(step, c.log_every_steps)]
        if interval:
          boundaries.append(_next_multiple(step, interval))
        num_steps = min(boundaries) - step
        try:
          loss = float(train_loop(iterator, tf.constant(num_steps, tf.int32)))
        except tf.errors.DataLossError as e:
          input_pipeline.reraise_naming_damaged_shard(self.manifest, mf.TRAIN, e)
        except PEER_FAILURES as e:
          if self.cluster is None:
            raise
          self._raise_peer_failure(e, step, num_steps)
        if not math.isfinite(loss):
          raise TrainingError(
              f"loss is {loss} in steps {step + 1}-{step + num_steps}; stopped without saving, "
              f"the last good checkpoint is {self.manager.latest_checkpoint}")
        step += num_steps
        window_steps += num_steps
        window_loss += loss * num_steps
        if step % c.log_every_steps == 0 or step == self.total_steps:
          elapsed = time.perf_counter() - window_start
          rate = window_steps * c.batch_size / max(elapsed, 1e-9)
          lr = float(self.optimizer.learning_rate.numpy())
          logging.info("step %d/%d (epoch %.2f): loss %.4f, %.0f examples/s, lr %.2e", step,
                       self.total_steps, step / self.steps_per_epoch, window_loss / window_steps,
                       rate, lr)
          with writer.as_default(step=step):
            tf.summary.scalar("loss", window_loss / window_steps)
            tf.summary.scalar("learning_rate", lr)
            tf.summary.scalar("examples_per_second", rate)
          window_start, window_steps, window_loss = time.perf_counter(), 0, 0.0
        evaluates = self._is_evaluation_step(step)
        if step % c.checkpoint_every_steps == 0 or (evaluates and c.selects_best):
          self._save(step)  # before a selection evaluation: see trainer/selection.py
        if evaluates:
          stopped_early = self._periodic_evaluation(step, periodic_eval, chosen)
        if stop.requested:
          self._save(step)
          logging.info("SIGTERM: saved a checkpoint at step %d; re-run to resume", step)
          interrupted = True
          break
    writer.flush()
    train_seconds = time.perf_counter() - train_started  # this invocation's loop, evals included
    if stopped_early and chosen is not None:
      best = chosen.best()
      logging.info("early stopping at step %d: %s did not improve for %d evaluations (best "
                   "%.4f at step %d)", step, chosen.metric, chosen.evaluations_since_best(),
                   best[chosen.metric], best["step"])
    elif stopped_early:
      logging.info("early stopping at step %d: the chief's decision", step)
    result_metrics, headline = None, ""
    if not interrupted:
      self._save(step)
    if not self.is_chief:
      shutil.rmtree(self._worker_tmp_dir(), ignore_errors=True)
      try:
        self._worker_tmp_dir().parent.rmdir()  # the last worker out removes worker_tmp/
      except OSError:
        pass
    elif not interrupted:
      chosen_step = step
      if chosen is not None and chosen.best() is not None:
        best, kept = chosen.best(), selection.read_best(self.checkpoint_dir)
        if kept is None or kept["step"] != best["step"]:
          raise TrainingError(self._best_mismatch(kept, best))
        self._restore_best(kept)
        chosen_step = best["step"]
      evaluated, headline = evaluate_every_split(c, self.manifest, self.model,
                                                 reranked_dir=self.model_dir)
      self._log_eval(None, evaluated, chosen_step, headline)
      result_metrics = {"model": c.model, "global_step": chosen_step, "trained_steps": step,
                        "train_seconds": round(train_seconds, 1), **evaluated,
                        **({"selection": chosen.summary()} if chosen is not None else {})}
      write_json_atomic(self.model_dir / METRICS_FILE, result_metrics)
      if c.export:
        path = self.task.export(self.model, c, self.manifest, self.model_dir, chosen_step)
        logging.info("exported %s (step %d)", path, chosen_step)
    return RunResult(step, interrupted, result_metrics, headline)

  def _raise_peer_failure(self, error: tf.errors.OpError, step: int, num_steps: int):
    """A collective failed: a peer died, hung (missed heartbeats) or is unreachable."""
    latest = tf.train.latest_checkpoint(str(self.model_dir / CHECKPOINT_DIR))
    reason = error.message.strip().splitlines()[0][:300]
    raise TrainingError(
        f"{self.cluster.worker_name}: steps {step + 1}-{step + num_steps} failed because a "
        f"worker of the cluster died or stopped responding ({type(error).__name__}: {reason}); "
        f"re-run every worker with the same flags to resume from "
        f"{latest or 'the start (no checkpoint yet)'}") from error

  def _save(self, step: int) -> None:
    """Checkpoints `step` unless that step is already the latest checkpoint."""
    latest = self.manager.latest_checkpoint
    if latest is None or not latest.endswith(f"-{step}"):
      self.manager.save(checkpoint_number=step)

  def _log_eval(self, evaluator, result: dict, step: int, headline: str = "") -> dict:
    logging.info("eval at step %d: %s", step, headline or evaluator.headline(result))
    if self._eval_writer is None:
      self._eval_writer = tf.summary.create_file_writer(str(self.model_dir / EVAL_SUMMARIES))
    writer = self._eval_writer
    with writer.as_default(step=step):
      for name, value in result.items():
        if isinstance(value, float):
          tf.summary.scalar(name, value)
    writer.flush()
    return result


def make_evaluator(config: TrainerConfig, manifest, max_users: int = 0,
                   split: str | None = None):
  """The evaluator of --eval_split (or `split`) for --model's task."""
  return task_class(config).make_evaluator(config, manifest, max_users, split)


def evaluate_every_split(config: TrainerConfig, manifest, model,
                         reranked_dir: Path | None = None) -> tuple[dict, str]:
  """The final evaluation (see the task's evaluate_every_split). Returns (metrics, headline)."""
  return task_class(config).evaluate_every_split(config, manifest, model, reranked_dir)


def evaluate_checkpoint(config: TrainerConfig, manifest) -> dict:
  """--mode=eval: the metrics of one checkpoint, computed as at the end of
  training (so the best checkpoint reproduces metrics.json), without training
  and without writing anything."""
  set_random_seeds(config.seed)
  prefix, step = selection.checkpoint_to_evaluate(Path(config.model_dir) / CHECKPOINT_DIR,
                                                  config.eval_checkpoint, report=logging.info)
  try:
    checkpoints.verify(prefix)
  except checkpoints.DamagedCheckpoint as e:
    raise DataError(f"--mode=eval: {e}") from e
  model = build_model(config, manifest)
  # A training checkpoint also holds the optimizer, which evaluation does not need.
  tf.train.Checkpoint(model=model).read(prefix).expect_partial().assert_existing_objects_matched()
  logging.info("evaluating %s (step %d)", prefix, step)
  result, headline = evaluate_every_split(config, manifest, model)
  return {"model": config.model, "global_step": step, "checkpoint": prefix, **result,
          "headline": headline}


def run_evaluation(config: TrainerConfig, manifest) -> str:
  """--mode=eval's output: writes --eval_metrics_file (only that) or returns the JSON."""
  with process_tempdir(config.model_dir):
    metrics = evaluate_checkpoint(config, manifest)
  headline = metrics.pop("headline")
  if not config.eval_metrics_file:
    return json.dumps(metrics, indent=1)
  write_json_atomic(config.eval_metrics_file, metrics)
  return f"trainer: step {metrics['global_step']}, {headline} ({config.eval_metrics_file})"


def summary_scalars(model_dir: str | Path, tag: str,
                    summaries: Path = TRAIN_SUMMARIES) -> dict[int, tuple[float, float]]:
  """{step: (wall time, value)} of one scalar the chief wrote to `summaries`
  (train, or EVAL_SUMMARIES) under model_dir; the first event of a step (the
  final evaluation repeats the chosen step's)."""
  values = {}
  for path in sorted((Path(model_dir) / summaries).glob("events*")):
    for record in tf.data.TFRecordDataset(str(path)):
      event = tf.compat.v1.Event.FromString(record.numpy())
      for value in event.summary.value:
        if value.tag == tag:
          values.setdefault(event.step, (event.wall_time, float(tf.make_ndarray(value.tensor))))
  return values


def train_scalars(model_dir: str | Path, tag: str) -> dict[int, float]:
  """{step: value} of one scalar the chief wrote to the train summaries."""
  return {step: value for step, (_, value) in summary_scalars(model_dir, tag).items()}


def _next_multiple(step: int, every: int) -> int:
  return (step // every + 1) * every


def train(config: TrainerConfig, manifest: mf.Manifest) -> RunResult:
  with process_tempdir(config.model_dir):
    return Trainer(config, manifest).run()


PROCESS_TMP_DIR = ".tmp"  # under model_dir: each trainer process's temporary files


@contextlib.contextmanager
def process_tempdir(model_dir: str | Path):
  """Points Python's temporary files (TensorFlow's autograph writes a module
  per traced function and removes it only at a clean exit) into
  model_dir/.tmp/HOST-PID for the run. Directories of processes of this host
  that are gone (a kill -9) are removed first, so leftovers of a model_dir's
  runs stay in it and do not accumulate in /tmp. A run that ends removes its own."""
  root = Path(model_dir).absolute() / PROCESS_TMP_DIR
  host = socket.gethostname()
  if root.is_dir():
    for entry in root.glob(f"{host}-*"):
      pid = entry.name.rsplit("-", 1)[-1]
      if pid.isdigit() and int(pid) != os.getpid() and not _process_alive(int(pid)):
        shutil.rmtree(entry, ignore_errors=True)
  mine = root / f"{host}-{os.getpid()}"
  mine.mkdir(parents=True, exist_ok=True)
  previous = tempfile.tempdir
  tempfile.tempdir = str(mine)
  try:
    yield mine
  finally:
    tempfile.tempdir = previous
    # Modules already loaded need their files no more; a later trace writes new ones.
    shutil.rmtree(mine, ignore_errors=True)
    with contextlib.suppress(OSError):
      root.rmdir()  # only when no other process of the run still has its folder there


def _process_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, another user's
    return True
  return True


def remove_leftovers(model_dir: Path) -> None:
  """What a killed run of this model_dir left half-written: TensorFlow's
  checkpoint temporaries (ckpt-N_temp/), this project's atomic-write
  temporaries (.NAME.tmp-*) and export copies (.export.tmp-*, .export.old-*).
  Only the writer of model_dir (the run holding its lock) calls this."""
  ours = (".*.tmp-*", ".*.old-*")
  checkpoints = model_dir / CHECKPOINT_DIR
  for folder, patterns in ((model_dir, ours), (checkpoints, ("*_temp", *ours)),
                           (checkpoints / selection.BEST_DIR, ("*_temp", *ours))):
    for stale in (path for pattern in patterns for path in folder.glob(pattern)):
      remove_path(stale)
      logging.info("removed %s, left by a run that was killed", stale)
