"""The retrieval job's output layout: what `preprocess --mode=ranking` and users read.

OUT/
  job.json                  the job's flags, written once by the first worker
  index/                    the FAISS index; labels.parquet for string item ids
  candidates/part-W-of-N.parquet   CANDIDATE columns, one row per (user, candidate)
  metrics.json              leave-one-out metrics of the candidates (when evaluated)
  _SUCCESS                  written last, when every part is present
"""

import pyarrow as pa

JOB_FILE = "job.json"
INDEX_DIR = "index"
LABELS_FILE = "labels.parquet"  # in INDEX_DIR, string ids only: label (int64) -> item_id
CANDIDATES_DIR = "candidates"
SUCCESS_FILE = "_SUCCESS"
METRICS_FILE = "metrics.json"
CANDIDATE_COLUMNS = ("user_id", "article_id", "recall_score", "recall_rank")


def candidate_schema(user_type: pa.DataType, item_type: pa.DataType) -> pa.Schema:
  """A candidate part's columns; the id types are the vocabularies' raw types."""
  return pa.schema([("user_id", user_type), ("article_id", item_type),
                    ("recall_score", pa.float32()), ("recall_rank", pa.int32())])
