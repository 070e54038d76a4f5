"""tf.distribute strategies by name.

  default       the default (no-op) strategy: one device, no wrapping.
  one_device    OneDeviceStrategy on the first GPU, else the CPU.
  mirrored      MirroredStrategy over all local GPUs, or over N logical CPU
                devices with --num_cpu_replicas=N (testing without GPUs).
  multi_worker  MultiWorkerMirroredStrategy configured by TF_CONFIG.
"""

import functools

import tensorflow as tf

from trainer.config import ConfigError, TrainerConfig


def configure_logical_cpus(count: int) -> list[str]:
  """Splits the CPU into `count` logical devices; returns their names.

  TensorFlow allows this only before it initialises its devices; a split
  made earlier (e.g. by a test harness) is reused when it is large enough.
  """
  cpu = tf.config.list_physical_devices("CPU")[0]
  existing = tf.config.get_logical_device_configuration(cpu) or []
  if len(existing) < count:
    try:
      tf.config.set_logical_device_configuration(
          cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)])
    except RuntimeError as e:
      raise ConfigError(f"--num_cpu_replicas={count}: TensorFlow already started with "
                        f"{max(len(existing), 1)} CPU device(s) ({e})") from e
  return [d.name for d in tf.config.list_logical_devices("CPU")][:count]


def mirrored(devices: tuple[str, ...] = ()) -> tf.distribute.MirroredStrategy:
  """One MirroredStrategy per device set per process.

  TF 2.21: a second MirroredStrategy over the same devices in one process
  reuses the first one's collective instance keys, and its first all-gather
  aborts ("Collective instance N expected type 0 ... but got type 2").
  """
  specs = (tf.DeviceSpec.from_string(d) for d in devices)
  return _mirrored(tuple(f"/device:{s.device_type}:{s.device_index}" for s in specs))


@functools.lru_cache(maxsize=None)
def _mirrored(devices: tuple[str, ...]) -> tf.distribute.MirroredStrategy:
  return tf.distribute.MirroredStrategy(list(devices) or None)


def create(config: TrainerConfig) -> tf.distribute.Strategy:
  if config.strategy == "multi_worker":
    # First: collectives must be configured before anything (even listing
    # logical devices) initialises TensorFlow's devices.
    return tf.distribute.MultiWorkerMirroredStrategy()
  if config.strategy == "default":
    return tf.distribute.get_strategy()
  if config.strategy == "one_device":
    gpus = tf.config.list_logical_devices("GPU")
    return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
  if config.strategy == "mirrored":
    cpu_devices = configure_logical_cpus(config.num_cpu_replicas) \
        if config.num_cpu_replicas else []
    return mirrored(tuple(cpu_devices))
  raise ValueError(f"unknown strategy {config.strategy!r}")
