"""tf.data readers over the shards a manifest lists.

The training reader is a callable taking a `tf.distribute.InputContext`
(the Model Garden pattern), for `distribute_datasets_from_function`:

  shard files (file-level split over input pipelines)
  -> per epoch: seeded file shuffle -> parallel deterministic interleave of
     TFRecordDataset -> seeded example shuffle -> batch (drop remainder)
     -> take(steps_per_epoch * local replicas)
  -> epochs chained from `start_epoch`, skip the batches already trained on
  -> vectorised parse_example on whole batches -> prefetch

Every epoch has the same number of steps on every pipeline (computed from
the manifest's per-shard counts), and its order depends only on (seed,
epoch), so a run that stopped after global step s resumes exactly at
epoch s // steps_per_epoch, batch s % steps_per_epoch: tf.data iterator
checkpoints do not work under distribution strategies, the data order does.
"""

import dataclasses

import tensorflow as tf

from contracts import manifest as mf
from contracts.errors import DataError


def parse_batch(serialized: tf.Tensor, feature_specs: dict[str, mf.FeatureSpec]) -> dict:
  """A batch of serialized tf.train.Examples -> dict of int32 (ids) / float32 tensors."""
  spec = {name: tf.io.FixedLenFeature(s.shape, tf.float32 if s.dtype == "float32" else tf.int64)
          for name, s in feature_specs.items()}
  parsed = tf.io.parse_example(serialized, spec)
  return {name: value if value.dtype == tf.float32 else tf.cast(value, tf.int32)
          for name, value in parsed.items()}


def split_files(manifest: mf.Manifest, split: str, pipeline_id: int,
                num_pipelines: int) -> list[mf.ShardInfo]:
  shards = list(manifest.split(split).shards)
  if len(shards) < num_pipelines:
    raise DataError(f"{manifest.path(mf.MANIFEST_FILE)}: split {split!r} has {len(shards)} "
                    f"shards for {num_pipelines} input pipelines (workers); re-run preprocess "
                    f"with --num_shards >= {num_pipelines}")
  return shards[pipeline_id::num_pipelines]


def steps_per_epoch(manifest: mf.Manifest, global_batch_size: int, num_replicas: int,
                    num_pipelines: int) -> int:
  """Synchronous steps per epoch: the fewest any input pipeline can feed."""
  per_replica = global_batch_size // num_replicas
  local_replicas = num_replicas // num_pipelines
  steps = min(sum(s.num_examples for s in split_files(manifest, mf.TRAIN, p, num_pipelines))
              // per_replica // local_replicas for p in range(num_pipelines))
  if steps == 0:
    raise DataError(f"{manifest.path(mf.MANIFEST_FILE)}: {manifest.split(mf.TRAIN).num_examples}"
                    f" training examples do not fill one step of --batch_size="
                    f"{global_batch_size}")
  return steps


@dataclasses.dataclass
class TrainReader:
  """Callable: InputContext -> infinite dataset of parsed per-replica batches."""
  manifest: mf.Manifest | mf.RankingManifest
  global_batch_size: int
  seed: int
  steps_per_epoch: int
  start_step: int = 0  # global steps already trained: where the stream starts
  shuffle_buffer: int = 16384
  cycle_length: int = 8

  def __call__(self, ctx: tf.distribute.InputContext | None = None) -> tf.data.Dataset:
    ctx = ctx or tf.distribute.InputContext()
    shards = split_files(self.manifest, mf.TRAIN, ctx.input_pipeline_id,
                         ctx.num_input_pipelines)
    files = [str(self.manifest.path(s.path)) for s in shards]
    per_replica = ctx.get_per_replica_batch_size(self.global_batch_size)
    local_replicas = ctx.num_replicas_in_sync // ctx.num_input_pipelines
    batches_per_epoch = self.steps_per_epoch * local_replicas
    compression = self.manifest.tfrecord_compression
    cycle = min(self.cycle_length, len(files))

    def epoch(e: tf.Tensor) -> tf.data.Dataset:
      seed = tf.cast(self.seed, tf.int64) * 1_000_003 + e
      names = tf.data.Dataset.from_tensor_slices(files).shuffle(
          len(files), seed=seed, reshuffle_each_iteration=False)
      records = names.interleave(
          lambda f: tf.data.TFRecordDataset(f, compression_type=compression),
          cycle_length=cycle, block_length=16, num_parallel_calls=cycle, deterministic=True)
      return (records.shuffle(self.shuffle_buffer, seed=seed, reshuffle_each_iteration=False)
              .batch(per_replica, drop_remainder=True)
              .take(batches_per_epoch))

    first_epoch, skip_steps = divmod(self.start_step, self.steps_per_epoch)
    dataset = (tf.data.Dataset.range(first_epoch, 2**62)
               .flat_map(epoch)
               .skip(skip_steps * local_replicas)  # before parsing: skipped batches stay cheap
               .map(lambda b: parse_batch(b, self.manifest.feature_specs),
                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
               .prefetch(tf.data.AUTOTUNE))
    options = tf.data.Options()
    options.deterministic = True
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return dataset.with_options(options)


def reraise_naming_damaged_shard(manifest: mf.Manifest, split: str, error: Exception):
  """On a read error, find the shard whose bytes differ from the manifest."""
  manifest.verify_shards(split, checksums=True)  # raises DataError naming the file
  raise DataError(f"{manifest.data_dir}: reading split {split!r} failed, but every shard "
                  f"matches its manifest checksum ({type(error).__name__}: {error})") from error
