"""The cluster of --strategy=multi_worker, read from TF_CONFIG (no TensorFlow).

TF_CONFIG is what every TensorFlow cluster manager sets on each host, e.g.
for the second of two workers:

  {"cluster": {"worker": ["10.0.0.1:2222", "10.0.0.2:2222"]},
   "task": {"type": "worker", "index": 1}}

An optional single "chief" job is allowed; without one, worker 0 is the
chief. Only the chief writes the model directory's final paths (checkpoints,
summaries, metrics, export); the others checkpoint into worker_tmp/ and
delete it (TensorFlow's documented multi-worker saving pattern).

This module only parses and checks TF_CONFIG, so `trainer` can reject a bad
one with a message naming the fault before TensorFlow starts (TensorFlow's
own errors for it are an opaque gRPC hang or a KeyError).
"""

import dataclasses
import json
import os

from contracts.errors import ConfigError

TRAINING_JOBS = ("chief", "worker")  # jobs that run training steps (MultiWorkerMirroredStrategy)


@dataclasses.dataclass(frozen=True)
class Cluster:
  jobs: dict[str, list[str]]  # job name -> "host:port" of each task
  task_type: str
  task_index: int

  @property
  def num_workers(self) -> int:
    """Processes that train (chief included): one input pipeline each."""
    return sum(len(self.jobs.get(job, [])) for job in TRAINING_JOBS)

  @property
  def is_chief(self) -> bool:
    if "chief" in self.jobs:
      return self.task_type == "chief"
    return self.task_type == "worker" and self.task_index == 0

  @property
  def worker_name(self) -> str:
    return f"{self.task_type}_{self.task_index}"


def _address_error(address) -> str | None:
  if not isinstance(address, str) or address.count(":") < 1:
    return "is not 'host:port'"
  host, port = address.rsplit(":", 1)
  if not host:
    return "has no host"
  if not port.isdigit() or not 0 < int(port) < 65536:
    return f"has port {port!r}, not a number in 1..65535"
  return None


def parse(tf_config: str | None) -> Cluster:
  """Parses and checks a TF_CONFIG value; ConfigError naming what is wrong."""
  if not tf_config:
    raise ConfigError("--strategy=multi_worker needs the TF_CONFIG environment variable: "
                      '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", '
                      '"index": i}} (README, "Training on several machines")')
  try:
    value = json.loads(tf_config)
  except json.JSONDecodeError as e:
    raise ConfigError(f"TF_CONFIG is not valid JSON ({e}): {tf_config[:200]!r}") from None
  if not isinstance(value, dict):
    raise ConfigError(f"TF_CONFIG must be a JSON object, got {type(value).__name__}")
  jobs = value.get("cluster")
  if not isinstance(jobs, dict) or not jobs:
    raise ConfigError('TF_CONFIG has no "cluster" object (job name -> list of "host:port")')
  for job, addresses in jobs.items():
    if job not in TRAINING_JOBS:
      raise ConfigError(f'TF_CONFIG cluster job {job!r} is not supported: --strategy='
                        f'multi_worker runs {" and ".join(TRAINING_JOBS)} jobs only (parameter '
                        'servers and evaluators are other strategies)')
    if not isinstance(addresses, list) or not addresses:
      raise ConfigError(f'TF_CONFIG cluster job {job!r} must be a non-empty list of "host:port"')
    for i, address in enumerate(addresses):
      error = _address_error(address)
      if error:
        raise ConfigError(f"TF_CONFIG cluster {job}[{i}] = {address!r} {error}")
  if len(jobs.get("chief", [])) > 1:
    raise ConfigError(f'TF_CONFIG cluster has {len(jobs["chief"])} "chief" tasks; at most 1')
  all_addresses = [a for addresses in jobs.values() for a in addresses]
  if len(set(all_addresses)) != len(all_addresses):
    raise ConfigError(f"TF_CONFIG cluster lists an address twice: {all_addresses}")
  task = value.get("task")
  if not isinstance(task, dict) or "type" not in task or "index" not in task:
    raise ConfigError('TF_CONFIG has no "task" object with "type" and "index" (which entry '
                      'of the cluster this process is)')
  task_type, index = task["type"], task["index"]
  if task_type not in jobs:
    raise ConfigError(f"TF_CONFIG task type {task_type!r} is not a job of the cluster "
                      f"({', '.join(jobs)})")
  if not isinstance(index, int) or isinstance(index, bool) or \
      not 0 <= index < len(jobs[task_type]):
    raise ConfigError(f"TF_CONFIG task index {index!r} is out of range: the {task_type!r} job "
                      f"has {len(jobs[task_type])} task(s)")
  return Cluster(jobs={job: list(a) for job, a in jobs.items()}, task_type=task_type,
                 task_index=index)


def from_environment() -> Cluster:
  return parse(os.environ.get("TF_CONFIG"))


def tf_config(jobs: dict[str, list[str]], task_type: str, task_index: int) -> str:
  """The TF_CONFIG value of one task (what a launcher sets per process)."""
  return json.dumps({"cluster": jobs, "task": {"type": task_type, "index": task_index}})
