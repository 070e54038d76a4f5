"""The trainer's export, loaded for batch inference (trainer/export.py writes it)."""

from pathlib import Path

import numpy as np

from contracts import manifest as mf
from contracts.errors import DataError
from contracts.export_manifest import EXPORT_DIR, ExportInfo, check_vocabularies, load_info


def check_export_matches_data(model_dir: Path, manifest: mf.Manifest) -> ExportInfo:
  """The export's info, after checking it was trained on this data's vocabularies."""
  info = load_info(model_dir)
  check_vocabularies(model_dir, info, manifest)
  embeddings = Path(model_dir) / EXPORT_DIR / info.item_embeddings
  if not embeddings.is_file():
    raise DataError(f"{embeddings}: missing (the export is incomplete)")
  if info.num_items != manifest.vocab_sizes["items"] or info.max_seq_len != manifest.max_seq_len:
    raise DataError(f"{model_dir}: export has {info.num_items} items and max_seq_len "
                    f"{info.max_seq_len}, {manifest.data_dir} has "
                    f"{manifest.vocab_sizes['items']} and {manifest.max_seq_len}")
  return info


def load_item_embeddings(model_dir: Path, info: ExportInfo) -> np.ndarray:
  path = Path(model_dir) / EXPORT_DIR / info.item_embeddings
  try:
    vectors = np.load(path)
  except (OSError, ValueError) as e:
    raise DataError(f"{path}: cannot read item embeddings ({e})") from e
  if vectors.shape != (info.num_items, info.emb_dim):
    raise DataError(f"{path}: shape {vectors.shape}, expected ({info.num_items}, {info.emb_dim})")
  return vectors.astype(np.float32, copy=False)


class UserTower:
  """history [n, L] int64 (+ user [n] int64) -> float32 [n, D] through the SavedModel."""

  def __init__(self, model_dir: Path, info: ExportInfo):
    import tensorflow as tf  # only once the inputs are checked: importing takes seconds

    path = Path(model_dir) / EXPORT_DIR / info.user_tower
    try:
      self._module = tf.saved_model.load(str(path))
    except (OSError, ValueError) as e:
      raise DataError(f"{path}: cannot load the user tower SavedModel ({e})") from e
    self._serve = self._module.signatures["serving_default"]
    self._tf = tf

  def __call__(self, history: np.ndarray, user: np.ndarray) -> np.ndarray:
    tf = self._tf
    out = self._serve(history=tf.constant(history, tf.int64), user=tf.constant(user, tf.int64))
    return out["vector"].numpy()
