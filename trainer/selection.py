"""Model selection: the validation curve, its best evaluation, early stopping.

No TensorFlow here. The training loop evaluates the valid split every
--eval_every_epochs (or --eval_every_steps) and at its last step, and keeps,
under model_dir/checkpoints (the chief writes them):

  validation_curve.json  {"metric", "split", "patience", "curve": [{"step", "epoch",
                          every metric of that evaluation}, ...]}
  best/best.json         {"step", "epoch", "metric", "value", "checkpoint": "ckpt-STEP"}
  best/ckpt-STEP.*       the model's weights at that evaluation

The curve is the record; the best evaluation (the first with the highest
value) and the evaluations since it are derived from it, so a resumed run
truncates the curve to its restored step and takes exactly the decisions an
uninterrupted run takes. The training loop checkpoints at every evaluation
step before it evaluates, and writes best/ before the curve: after a crash
between the two, the restored step's evaluation is repeated and writes the
same best/ again.
"""

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

from contracts.errors import ConfigError, DataError
from contracts.fileio import write_json_atomic
from contracts.model_layout import BEST_DIR, BEST_FILE, CURVE_FILE
from trainer import checkpoints



@dataclasses.dataclass
class Selection:
  """The validation curve of one run and the decisions it implies."""
  metric: str
  split: str
  patience: int  # evaluations without improvement before stopping; 0: never stop
  curve: list[dict] = dataclasses.field(default_factory=list)

  def best(self) -> dict | None:
    """The first evaluation with the highest value of `metric`."""
    best = None
    for entry in self.curve:
      if best is None or entry[self.metric] > best[self.metric]:
        best = entry
    return best

  def evaluations_since_best(self) -> int:
    best = self.best()
    return 0 if best is None else sum(1 for e in self.curve if e["step"] > best["step"])

  @property
  def exhausted(self) -> bool:
    """Patience is used up: training stops here."""
    return self.patience > 0 and self.best() is not None and \
        self.evaluations_since_best() >= self.patience

  def has(self, step: int) -> bool:
    return any(e["step"] == step for e in self.curve)

  def add(self, entry: dict) -> bool:
    """Appends an evaluation; True if it is the new best."""
    if self.curve and entry["step"] <= self.curve[-1]["step"]:
      raise ValueError(f"evaluation at step {entry['step']} after step {self.curve[-1]['step']}")
    if self.metric not in entry:
      raise ValueError(f"the evaluation has no {self.metric!r}: {sorted(entry)}")
    previous = self.best()
    self.curve.append(entry)
    return previous is None or entry[self.metric] > previous[self.metric]

  def truncate(self, step: int) -> None:
    """Forgets evaluations after `step` (a run resumed from an earlier checkpoint)."""
    self.curve = [e for e in self.curve if e["step"] <= step]

  def summary(self) -> dict:
    """What metrics.json says about the choice."""
    best = self.best()
    return {"metric": self.metric, "split": self.split, "patience": self.patience,
            "best_step": best["step"] if best else None,
            "best_epoch": best["epoch"] if best else None,
            "best_value": best[self.metric] if best else None,
            "stopped_early": self.exhausted,
            "evaluations": len(self.curve),
            "curve": self.curve}

  def save(self, checkpoint_dir: Path) -> None:
    write_json_atomic(Path(checkpoint_dir) / CURVE_FILE,
                      {"metric": self.metric, "split": self.split, "patience": self.patience,
                       "curve": self.curve})


def load(checkpoint_dir: Path, metric: str, split: str, patience: int,
         restored_step: int) -> Selection:
  """The run's curve up to `restored_step` (empty for a new run)."""
  path = Path(checkpoint_dir) / CURVE_FILE
  selection = Selection(metric, split, patience)
  if not path.is_file():
    return selection
  try:
    saved = json.loads(path.read_text())
    curve = list(saved["curve"])
  except (ValueError, KeyError, TypeError) as e:
    raise DataError(f"{path}: not a validation curve ({e}); delete it to restart the "
                    "selection") from e
  if saved.get("metric") != metric or saved.get("split") != split:
    raise DataError(f"{path}: this run selects on {saved.get('split')} "
                    f"{saved.get('metric')}, not {split} {metric}; use another --model_dir or "
                    f"--early_stopping_metric={saved.get('metric')}")
  selection.curve = curve
  selection.truncate(restored_step)
  return selection


def best_file(checkpoint_dir: Path) -> Path:
  return Path(checkpoint_dir) / BEST_DIR / BEST_FILE


def read_best(checkpoint_dir: Path) -> dict | None:
  """best.json, or None when the run has kept no best checkpoint."""
  path = best_file(checkpoint_dir)
  if not path.is_file():
    return None
  try:
    return json.loads(path.read_text())
  except ValueError as e:
    raise DataError(f"{path}: not a best-checkpoint record ({e})") from e


def best_prefix(checkpoint_dir: Path, best: dict) -> Path:
  return Path(checkpoint_dir) / BEST_DIR / best["checkpoint"]


def checkpoint_to_evaluate(checkpoint_dir: Path, which: str,
                           report: Callable[[str], None] | None = None) -> tuple[str, int]:
  """--eval_checkpoint (best | latest | "" | a path prefix) -> (prefix, its step).

  "" is what the training run evaluated and exported: the best checkpoint
  when it kept one, else the latest: the state file's, or the newest
  ckpt-N.index when the state file is missing or garbage (said through
  `report`). No TensorFlow: a wrong choice is a flag error before it starts.
  """
  best = read_best(checkpoint_dir)
  if which == "best" or (not which and best is not None):
    if best is None:
      raise ConfigError(f"--eval_checkpoint=best: no {best_file(checkpoint_dir)} (trained "
                        "without --early_stopping_metric?)")
    return str(best_prefix(checkpoint_dir, best)), int(best["step"])
  prefix = which
  if which in ("", "latest"):
    listing = checkpoints.listed(checkpoint_dir)
    prefix = listing.prefixes[-1] if listing.prefixes else None
    if listing.recovered and prefix and report is not None:
      report(f"{listing.recovered}; the latest ckpt-N.index is {prefix}")
  if not prefix:
    why = f" ({listing.recovered})" if which in ("", "latest") and listing.recovered else ""
    raise ConfigError(f"--eval_checkpoint={which or 'latest'}: no checkpoint in "
                      f"{checkpoint_dir}{why}")
  if not Path(prefix + ".index").is_file():
    raise ConfigError(f"--eval_checkpoint={which or 'latest'}: {prefix}.index does not exist")
  return prefix, checkpoints.number(prefix)
