"""What the trainer's export directory holds: read without TensorFlow.

trainer/export.py writes it; the retrieval job reads it through `load_info`.
"""

import dataclasses
import json
from pathlib import Path

from preprocess import manifest as mf
from preprocess.errors import DataError
from preprocess.fileio import sha256_file

EXPORT_DIR = "export"
EXPORT_MANIFEST = "export_manifest.json"
USER_TOWER = "user_tower"
ITEM_EMBEDDINGS = "item_embeddings.npy"


@dataclasses.dataclass(frozen=True)
class ExportInfo:
  model: str
  emb_dim: int
  max_seq_len: int
  num_items: int
  num_users: int
  data_dir: str
  data_fingerprint: str  # SHA-256 of the data's vocab/items.parquet
  global_step: int
  user_tower: str = USER_TOWER
  item_embeddings: str = ITEM_EMBEDDINGS


def data_fingerprint(manifest: mf.Manifest) -> str:
  """SHA-256 of the data's item vocabulary: a model only fits data with the same one."""
  return sha256_file(manifest.path(mf.ITEMS_FILE))


def load_info(model_dir: Path | str) -> ExportInfo:
  """Reads model_dir/export/export_manifest.json (errors name what is missing)."""
  path = Path(model_dir) / EXPORT_DIR / EXPORT_MANIFEST
  if not path.is_file():
    raise DataError(f"{Path(model_dir)}: no {EXPORT_DIR}/{EXPORT_MANIFEST} (not a trainer "
                    "model_dir, or training has not finished)")
  try:
    return ExportInfo(**json.loads(path.read_text()))
  except (ValueError, TypeError) as e:
    raise DataError(f"{path}: malformed export manifest ({e})") from e
