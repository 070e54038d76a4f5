"""`retrieval --engine=ray`: every share of the job on a Ray cluster.

The job's users are cut into --num_workers shares exactly as for the
default engine (retrieval/job.py), so the parts, their names and the
metrics are the same as N hand-started workers would write. The shares are
a Ray Dataset; `map_batches` hands them, one at a time, to a pool of actors,
each of which claims the job's output, loads the user tower and the FAISS
index once (`job.ShareRunner`) and runs `run_share` for every share it is
given. The driver checks the flags and --output_dir before Ray starts,
claims the output first (so --overwrite happens once), and writes
metrics.json and _SUCCESS when every share's marker is there.

Failures: a part is renamed into place complete and a share skips its parts
that exist, so when Ray restarts a dead actor and retries its share, or
when the whole job is re-run after a crash, no part is written twice and no
partial part remains (a share first removes the temporaries of its killed
attempt). An exception in a share fails the job; the same command resumes it.

Paths must be visible to every node under the same name (a shared file
system); locks are `flock`s on the output directory.
"""

import dataclasses
import json
import os

from absl import logging

from contracts import cli
from contracts import ray_cluster
from contracts.errors import ConfigError
from retrieval import job


def import_ray():
  """Ray with Ray Data, or a ConfigError naming the extra that installs them."""
  ray, _ = cli.import_extra("--engine=ray", "Ray", cli.RAY_EXTRA, "ray", "ray.data")
  return ray


class ShareWorker:
  """A Ray Data actor: one ShareRunner for its life, one share per batch."""

  def __init__(self, config: job.RetrievalConfig, cpus_per_worker: int):
    # Before TensorFlow and FAISS start in this process: as many threads as the actor's CPUs.
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", str(cpus_per_worker))
    os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
    if not config.threads:
      config = dataclasses.replace(config, threads=cpus_per_worker)
    self.opened = job.open_job(config)
    self.runner = job.ShareRunner(config, self.opened)

  def __call__(self, batch: dict) -> dict:
    shares = [int(w) for w in batch["share"]]
    params = [json.dumps(self.runner.run_share(w), sort_keys=True) for w in shares]
    return {"share": shares, "search_params": params}


def run(config: job.RetrievalConfig, ray_address: str = "", num_actors: int = 0,
        cpus_per_worker: int = 1, num_gpus: float = 0.0,
        worker_class: type = ShareWorker) -> dict:
  """Runs every share of `config`'s job (config.num_workers of them) on Ray;
  returns the job's metrics. `worker_class` is the actor (tests substitute one)."""
  if config.worker_index:
    raise ConfigError(f"--worker_index={config.worker_index}: --engine=ray runs every share "
                      "itself; leave it at 0")
  ray = import_ray()
  job.preflight(config)  # a bad flag or --output_dir is refused before Ray starts
  ray_cluster.connect(ray, ray_address, include_dashboard=False, log_to_driver=False)
  with job.open_job(config) as opened:  # validates, and replaces with --overwrite once
    actors = num_actors or max(1, int(ray.cluster_resources().get("CPU", 1)) // cpus_per_worker)
    actors = min(actors, config.num_workers)
    logging.info("retrieval on Ray: %d shares over %d actors (%d CPU%s%s each)",
                 config.num_workers, actors, cpus_per_worker, "s" if cpus_per_worker > 1 else "",
                 f", {num_gpus:g} GPU" if num_gpus else "")
    shares = ray.data.from_items([{"share": w} for w in range(config.num_workers)])
    done = shares.map_batches(
        worker_class, batch_size=1,
        fn_constructor_kwargs={"config": dataclasses.replace(config, overwrite=False),
                               "cpus_per_worker": cpus_per_worker},
        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus_per_worker,
        num_gpus=num_gpus or None).take_all()
    finished = sorted(int(row["share"]) for row in done)
    if finished != list(range(config.num_workers)):
      raise RuntimeError(f"Ray returned shares {finished}, expected 0..{config.num_workers - 1}")
    # Every actor set the same parameters on the same index.
    search_params = json.loads(done[0]["search_params"])
    return job.finish_if_complete(opened.out, config, opened.plan, search_params)
