"""Writes a deterministic synthetic click log in the notebooks' news schema.

  python tools/make_synthetic.py --preset=demo --output_dir=build/demo/raw
  python tools/make_synthetic.py --preset=news --output_dir=/tmp/news_scale   # 1.1M clicks

Then: preprocess --source=news --input=<output_dir> --output_dir=...
The structure of the log is described in preprocess/synthetic.py.
"""

import dataclasses
import sys

from absl import app, flags

from contracts.errors import DataError
from preprocess import synthetic

FLAGS = flags.FLAGS
flags.DEFINE_enum("preset", "demo", list(synthetic.PRESETS), "Size preset.")
flags.DEFINE_string("output_dir", None, "Where train_click_log.csv and articles.csv go.")
flags.DEFINE_boolean("overwrite", False, "Replace a non-empty --output_dir.")
flags.DEFINE_integer("seed", None, "Override the preset's seed.")
flags.DEFINE_integer("num_users", None, "Override the preset's user count.")
flags.DEFINE_integer("num_items", None, "Override the preset's item count.")
flags.DEFINE_integer("num_categories", None, "Override the preset's category count.")
flags.DEFINE_float("mean_clicks_per_user", None, "Override the preset's mean clicks per user.")
flags.DEFINE_float("interrupt_prob", None, "Override the preset's share of interruptions "
                   "(trending clicks outside the thread; 0: none).")
flags.mark_flag_as_required("output_dir")


def main(argv):
  del argv
  overrides = {name: getattr(FLAGS, name) for name in
               ("seed", "num_users", "num_items", "num_categories", "mean_clicks_per_user",
                "interrupt_prob")
               if getattr(FLAGS, name) is not None}
  config = dataclasses.replace(synthetic.PRESETS[FLAGS.preset], **overrides)
  try:
    path = synthetic.write(config, FLAGS.output_dir, overwrite=FLAGS.overwrite)
  except (ValueError, DataError) as e:
    sys.exit(f"make_synthetic: error: {e}")
  print(f"make_synthetic: wrote {path} ({FLAGS.preset}: {config})")


if __name__ == "__main__":
  app.run(main)
