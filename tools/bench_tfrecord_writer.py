"""Ways of writing int64 tf.train.Examples to a TFRecord file, timed.

  python tools/bench_tfrecord_writer.py --num_examples=200000 --history=50

Compares, on the same examples (history ids drawn up to 364k, as in the
news data), one process:
  proto_per_row   tf.train.Example built per row from Python lists
  tf_writer_gz6   TFRecordWriter.write loop over serialized protos, GZIP level 6
  tf_writer_gz1   the same at GZIP level 1
  numpy_gz1       preprocess.tfrecord_writer (vectorised encode + frame + zlib 1)
Rates are rows/s of that step alone (proto rows are pre-serialized for the
writer loops). Figures go to BUILD_NOTES.md with this command line.
"""

import json
import os
import tempfile
import time

import numpy as np
from absl import app, flags

from preprocess.tfrecord_writer import TFRecordFileWriter

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_examples", 200_000, "Examples to write.")
flags.DEFINE_integer("history", 50, "History length.")


def main(argv):
  del argv
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow as tf  # only this benchmark needs it

  n, width = FLAGS.num_examples, FLAGS.history
  rng = np.random.default_rng(0)
  features = {
      "history": rng.zipf(1.2, size=(n, width)) % 364_047,
      "length": np.full(n, width),
      "target": rng.integers(1, 364_047, n),
      "target_category": rng.integers(1, 461, n),
      "user": rng.integers(1, 200_000, n),
  }
  results = {}
  lists = {k: v.tolist() for k, v in features.items()}
  started = time.perf_counter()
  protos = []
  for i in range(n):
    protos.append(tf.train.Example(features=tf.train.Features(feature={
        k: tf.train.Feature(int64_list=tf.train.Int64List(
            value=v[i] if isinstance(v[i], list) else [v[i]]))
        for k, v in lists.items()})).SerializeToString())
  results["proto_per_row"] = n / (time.perf_counter() - started)
  with tempfile.TemporaryDirectory() as tmp:
    for level in (6, 1):
      path = os.path.join(tmp, f"tf{level}.tfrecord.gz")
      started = time.perf_counter()
      options = tf.io.TFRecordOptions(compression_type="GZIP", compression_level=level)
      with tf.io.TFRecordWriter(path, options) as writer:
        for proto in protos:
          writer.write(proto)
      results[f"tf_writer_gz{level}"] = n / (time.perf_counter() - started)
      results[f"tf_writer_gz{level}_bytes_per_row"] = os.path.getsize(path) / n
    path = os.path.join(tmp, "numpy.tfrecord.gz")
    started = time.perf_counter()
    with TFRecordFileWriter(path, "GZIP") as writer:
      for begin in range(0, n, 16384):
        writer.write_examples({k: v[begin:begin + 16384] for k, v in features.items()})
      writer.close()
    results["numpy_gz1"] = n / (time.perf_counter() - started)
    results["numpy_gz1_bytes_per_row"] = os.path.getsize(path) / n
  print(json.dumps({k: round(v, 1) for k, v in results.items()}))


if __name__ == "__main__":
  app.run(main)
