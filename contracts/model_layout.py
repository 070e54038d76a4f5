"""What a trainer model_dir holds, for the tools and jobs that read it.

MODEL/
  trainer_config.json       every field of the run's TrainerConfig
  checkpoints/              latest checkpoints; best/ with best.json under selection
  metrics.json              the final evaluation of every split (and the selection)
  export/                   see contracts/export_manifest.py
"""

CONFIG_FILE = "trainer_config.json"
CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.json"
BEST_DIR = "best"  # under CHECKPOINT_DIR
BEST_FILE = "best.json"  # under BEST_DIR: step, epoch, metric, value
CURVE_FILE = "validation_curve.json"  # under CHECKPOINT_DIR
