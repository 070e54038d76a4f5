"""The retrieval job's output layout: what `preprocess --mode=ranking` and users read.

OUT/
  job.json                  the job's flags, written once by the first worker;
                            `candidates_version` says which columns the parts have
  index/                    the FAISS index; labels.parquet for string item ids
  candidates/part-W-of-N.parquet   CANDIDATE columns, one row per (user, candidate)
  metrics.json              leave-one-out metrics of the candidates (when evaluated)
  _SUCCESS                  written last, when every part is present

Version 2 names the candidate column `item_id`, as the vocabularies name the
items whatever the log called them. Version 1 (a job.json without the key)
named it `article_id`; readers map it with `item_column`.
"""

import pyarrow as pa

from contracts.errors import DataError

JOB_FILE = "job.json"
INDEX_DIR = "index"
LABELS_FILE = "labels.parquet"  # in INDEX_DIR, string ids only: label (int64) -> item_id
CANDIDATES_DIR = "candidates"
SUCCESS_FILE = "_SUCCESS"
METRICS_FILE = "metrics.json"
VERSION_KEY = "candidates_version"
CANDIDATES_VERSION = 2
ITEM_COLUMN = "item_id"
CANDIDATE_COLUMNS = ("user_id", ITEM_COLUMN, "recall_score", "recall_rank")
# The item column of each version a reader understands.
_ITEM_COLUMN_OF_VERSION = {1: "article_id", CANDIDATES_VERSION: ITEM_COLUMN}


def candidate_schema(user_type: pa.DataType, item_type: pa.DataType) -> pa.Schema:
  """A candidate part's columns; the id types are the vocabularies' raw types."""
  return pa.schema([("user_id", user_type), (ITEM_COLUMN, item_type),
                    ("recall_score", pa.float32()), ("recall_rank", pa.int32())])


def item_column(job: dict, where: str) -> str:
  """The parts' item column for a job.json (`where` names it in the error)."""
  version = job.get(VERSION_KEY, 1)
  if version not in _ITEM_COLUMN_OF_VERSION:
    raise DataError(f"{where}: {VERSION_KEY} {version!r}, this code reads "
                    f"{', '.join(map(str, _ITEM_COLUMN_OF_VERSION))}: written by a newer "
                    "retrieval")
  return _ITEM_COLUMN_OF_VERSION[version]
