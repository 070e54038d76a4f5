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
import functools
import os

from absl import app, flags, logging

from preprocess import cli, locks
from preprocess.errors import DataError
from trainer import cluster
from trainer import config as config_lib

FLAGS = flags.FLAGS
_D = config_lib.TrainerConfig()


def _by_model(field: str) -> str:
  return "default: " + ", ".join(f"{defaults[field]} for {model}"
                                 for model, defaults in config_lib.MODEL_DEFAULTS.items())


flags.DEFINE_enum("model", _D.model, config_lib.MODELS, "Model to train.")
flags.DEFINE_enum("mode", _D.mode, config_lib.MODES,
                  "train: train (or resume), evaluate, export. eval: evaluate --eval_checkpoint of "
                  "--model_dir on every held-out split and write only --eval_metrics_file; the "
                  "model's settings come from its trainer_config.json, the evaluation flags from "
                  "the command line.")
flags.DEFINE_string("data_dir", None, "preprocess output directory (has manifest.json).")
flags.DEFINE_string("model_dir", None, "Checkpoints, summaries, metrics and export go here.")
flags.DEFINE_enum("strategy", _D.strategy, config_lib.STRATEGIES, "tf.distribute strategy.")
flags.DEFINE_integer("num_cpu_replicas", _D.num_cpu_replicas,
                     "mirrored: split the CPU into N logical devices (testing without GPUs).")
flags.DEFINE_integer("batch_size", _D.batch_size, "Global batch size over all replicas.")
flags.DEFINE_integer("epochs", None, "Epochs over the training split (with early stopping: "
                     f"the most it may train; {_by_model('epochs')}).")
flags.DEFINE_integer("train_steps", _D.train_steps, "If > 0: total steps (overrides --epochs).")
flags.DEFINE_float("learning_rate", None,
                   f"Peak Adam learning rate ({_by_model('learning_rate')}).")
flags.DEFINE_enum("lr_schedule", None, config_lib.LR_SCHEDULES,
                  "After warm-up: constant, or cosine decay to 0 at the last step "
                  f"({_by_model('lr_schedule')}).")
flags.DEFINE_integer("warmup_steps", _D.warmup_steps, "Linear learning-rate warm-up steps.")
flags.DEFINE_float("weight_decay", None,
                   "Decoupled weight decay (AdamW) of kernels and embeddings, scaled by the "
                   "learning rate; biases and LayerNorm are not decayed. 0: plain Adam "
                   f"({_by_model('weight_decay')}).")
flags.DEFINE_integer("seed", _D.seed, "Seed of initialisation, dropout and data order.")
flags.DEFINE_integer("shuffle_buffer", _D.shuffle_buffer, "Example shuffle buffer.")
flags.DEFINE_integer("emb_dim", None,
                     f"Embedding and output vector size ({_by_model('emb_dim')}).")
flags.DEFINE_integer("num_heads", _D.num_heads, "sasrec: attention heads.")
flags.DEFINE_integer("num_blocks", _D.num_blocks, "sasrec: transformer blocks.")
flags.DEFINE_integer("ff_dim", None, f"sasrec: feed-forward width ({_by_model('ff_dim')}).")
flags.DEFINE_boolean("share_item_embeddings", _D.share_item_embeddings,
                     "sasrec: score against the input item embeddings (no projection heads).")
flags.DEFINE_float("item_dropout", _D.item_dropout,
                   "sasrec: dropout of the item embeddings the softmax scores, in training.")
flags.DEFINE_float("dropout", None, f"Dropout rate ({_by_model('dropout')}).")
flags.DEFINE_float("temperature", None,
                   f"Softmax temperature on cosine scores ({_by_model('temperature')}).")
flags.DEFINE_list("tower_units", list(map(str, _D.tower_units)),
                  "two_tower: hidden layer widths of both towers; dien: of the top MLP.")
flags.DEFINE_integer("gru_units", _D.gru_units, "dien: GRU state size (extractor and evolution).")
flags.DEFINE_enum("evolution", _D.evolution, list(config_lib.EVOLUTIONS),
                  "dien: augru (attention scales the update gate, the DIEN paper's best) or "
                  "aigru (attention scales the GRU input, the notebook).")
flags.DEFINE_float("aux_loss_weight", _D.aux_loss_weight,
                   "dien: weight of the auxiliary next-click loss on the interest extractor "
                   "(the paper's 1; 0: off, the notebook).")
flags.DEFINE_boolean("retrieval_item_vectors", _D.retrieval_item_vectors,
                     "dien: add the retrieval model's item vectors (frozen) to every item's "
                     "representation.")
flags.DEFINE_boolean("wide_dense", _D.wide_dense,
                     "dien: add a linear logit over the standardised dense features (Wide & Deep).")
flags.DEFINE_list("rank_eval_topk", list(map(str, _D.rank_eval_topk)),
                  "dien: HitRate/NDCG cut-offs of the reranked lists.")
flags.DEFINE_enum("loss", None, list(config_lib.LOSSES),
                  "in_batch: in-batch negatives (any catalogue size); softmax: full softmax over "
                  "every item (exact, for catalogues up to ~100k items); sampled_softmax: "
                  "--num_sampled catalogue negatives per step; auto: softmax when its "
                  f"logits fit in memory, else in_batch ({_by_model('loss')}).")
flags.DEFINE_integer("num_sampled", _D.num_sampled,
                     "sampled_softmax: negatives drawn from the whole catalogue per step, shared "
                     "by every position and replica.")
flags.DEFINE_enum("sampler", _D.sampler, list(config_lib.SAMPLERS),
                  "sampled_softmax: uniform over the catalogue, or popularity (training target "
                  "counts); logQ correction either way.")
flags.DEFINE_boolean("symmetric_loss", _D.symmetric_loss, "Add the item->user softmax.")
flags.DEFINE_boolean("cross_replica_negatives", _D.cross_replica_negatives,
                     "Gather negatives from all replicas (the global batch).")
flags.DEFINE_boolean("remove_accidental_hits", _D.remove_accidental_hits,
                     "A batch item equal to the positive is not a negative.")
flags.DEFINE_boolean("logq_correction", _D.logq_correction,
                     "Subtract log sampling probability from in-batch logits.")
flags.DEFINE_boolean("all_positions", _D.all_positions,
                     "windows data: a loss on every position, not only the last.")
flags.DEFINE_integer("num_negatives", _D.num_negatives,
                     "0: every in-batch positive is a negative; N: a random pool of N of them "
                     "per step (bounds the all-position loss of windows data).")
flags.DEFINE_integer("steps_per_loop", _D.steps_per_loop, "Steps per tf.function call.")
flags.DEFINE_integer("log_every_steps", _D.log_every_steps, "Progress line every N steps.")
flags.DEFINE_integer("checkpoint_every_steps", _D.checkpoint_every_steps,
                     "Checkpoint every N steps (and at the end).")
flags.DEFINE_integer("keep_checkpoints", _D.keep_checkpoints, "Checkpoints kept.")
flags.DEFINE_integer("eval_every_steps", _D.eval_every_steps,
                     "Evaluate every N steps (0: only at the end).")
flags.DEFINE_integer("eval_every_epochs", None,
                     f"Evaluate every N epochs ({_by_model('eval_every_epochs')}; 0 when "
                     "--eval_every_steps is set).")
flags.DEFINE_string("early_stopping_metric", None,
                    "Select the model on this metric of the valid split at each periodic "
                    "evaluation (e.g. ndcg@10, hit_rate@20); '' turns selection off "
                    f"({_by_model('early_stopping_metric')}).")
flags.DEFINE_integer("early_stopping_patience", None,
                     "Stop after N periodic evaluations without improvement; 0: train every "
                     f"epoch and still export the best ({_by_model('early_stopping_patience')}).")
flags.DEFINE_enum("eval_split", _D.eval_split, ["valid", "test"], "Split to evaluate on.")
flags.DEFINE_list("eval_topk", list(map(str, _D.eval_topk)), "HitRate/NDCG cut-offs.")
flags.DEFINE_integer("eval_negatives", _D.eval_negatives,
                     "If > 0: rank the target among N sampled unseen items (SASRec paper).")
flags.DEFINE_integer("eval_batch_size", _D.eval_batch_size, "Users per evaluation batch.")
flags.DEFINE_integer("eval_max_users", _D.eval_max_users,
                     "If > 0: periodic evaluations use this many seeded random users.")
flags.DEFINE_boolean("mixed_precision", _D.mixed_precision,
                     "float16 on GPU, bfloat16 on CPU compute; float32 variables and loss.")
flags.DEFINE_boolean("jit_compile", None, "XLA-compile the training step (default: on for "
                     "sasrec and two_tower, off for dien, which XLA on CPU runs slower).")
flags.DEFINE_boolean("export", _D.export, "Export the user tower and item embeddings.")
flags.DEFINE_string("eval_checkpoint", _D.eval_checkpoint,
                    "--mode=eval: best, latest or a checkpoint path (default: best when the run "
                    "kept one, else latest).")
flags.DEFINE_string("eval_metrics_file", _D.eval_metrics_file,
                    "--mode=eval: write the metrics JSON here (default: print it).")


def config_from_flags() -> config_lib.TrainerConfig:
  values = {}
  for field in config_lib.TrainerConfig.__dataclass_fields__:
    value = getattr(FLAGS, field)
    if field in ("tower_units", "eval_topk", "rank_eval_topk"):
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
      config_lib.check_saved_config(config)  # again: now no other trainer can change model_dir
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
