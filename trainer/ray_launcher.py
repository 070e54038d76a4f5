"""`trainer --launcher=ray`: the unchanged training function on N Ray Train workers.

Ray Train's TensorflowTrainer starts --num_workers worker processes on the
cluster and sets on each the TF_CONFIG a cluster manager would (worker 0 is
the chief), so every worker runs exactly what `trainer
--strategy=multi_worker` runs under tools/launch_workers.py: the same
config, the same MultiWorkerMirroredStrategy, the chief-only writes, the
checkpoints and exact resume in --model_dir. The driver (this process)
checks the flags, holds the model_dir lock for the run and reads the
chief's metrics.json at the end. A failed run is resumed by running the
same command again, as with any launcher; Ray Train's own checkpoints are
not used. Its run state goes to MODEL/ray_train/.

Paths must be visible to every node under the same name (a shared file
system or a TensorFlow file system URI).
"""

import dataclasses
import json
import os
import time
from pathlib import Path

from contracts import cli
from contracts import ray_cluster
from contracts.errors import ConfigError
from contracts.model_layout import METRICS_FILE
from trainer.config import TrainerConfig

RAY_TRAIN_DIR = "ray_train"  # under model_dir: Ray Train's run state


def import_ray_train():
  """Ray and Ray Train's TensorFlow pieces, or a ConfigError naming the extra."""
  ray, train, tensorflow_train = cli.import_extra(
      "--launcher=ray", "Ray Train", cli.RAY_EXTRA, "ray", "ray.train", "ray.train.tensorflow")
  return ray, train.RunConfig, train.ScalingConfig, tensorflow_train.TensorflowTrainer


def train_on_worker(loop_config: dict) -> None:
  """What each Ray Train worker runs: the trainer's own training function."""
  # pylint: disable=import-outside-toplevel
  threads = loop_config.get("intra_op_threads")
  if threads:
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", str(threads))
  from trainer import config as config_lib
  from trainer import train_lib
  config = TrainerConfig.from_dict(loop_config["config"])
  manifest = config_lib.validate(config)  # reads the TF_CONFIG Ray Train set
  result = train_lib.train(config, manifest)
  if result.interrupted:
    raise RuntimeError(f"training stopped at step {result.global_step} (SIGTERM); the same "
                       "command resumes it")


def run(config: TrainerConfig, num_workers: int, ray_address: str = "",
        cpus_per_worker: int = 1, use_gpu: bool = False) -> dict:
  """Trains `config` (strategy multi_worker) on `num_workers` Ray Train workers;
  returns the chief's metrics.json."""
  if config.strategy != "multi_worker":
    raise ConfigError(f"--strategy={config.strategy}: --launcher=ray trains with "
                      "--strategy=multi_worker (one MultiWorkerMirroredStrategy over the workers)")
  if num_workers < 1:
    raise ConfigError(f"--num_workers={num_workers}: must be >= 1")
  ray, RunConfig, ScalingConfig, TensorflowTrainer = import_ray_train()
  ray_cluster.connect(ray, ray_address, include_dashboard=False, log_to_driver=True)
  model_dir = Path(config.model_dir).absolute()
  trainer = TensorflowTrainer(
      train_on_worker,
      train_loop_config={"config": dataclasses.asdict(config),
                         "intra_op_threads": cpus_per_worker},
      scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                   resources_per_worker={"CPU": cpus_per_worker}),
      run_config=RunConfig(name=f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
                           storage_path=str(model_dir / RAY_TRAIN_DIR)))
  result = trainer.fit()
  if result.error is not None:
    raise RuntimeError(f"a Ray Train worker failed: {result.error}")
  return json.loads((model_dir / METRICS_FILE).read_text())
