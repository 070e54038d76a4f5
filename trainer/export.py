"""The trainer's export: what the retrieval job (and serving) loads.

  model_dir/export/
    export_manifest.json   this module's ExportInfo: model, sizes, vocabulary fingerprints
    user_tower/            SavedModel, signature serving_default:
                             history [None, max_seq_len] int64 item indices (0 = padding,
                               left-padded, latest click last)
                             user    [None] int64 user index (ignored by sasrec)
                           -> vector [None, emb_dim] float32, L2-normalised
    item_embeddings.npy    float32 [num_items, emb_dim]; row i = item index i (row 0,
                           padding, is zeros); raw ids: the data's vocab/items.parquet

The ranker (dien) exports instead:

  model_dir/export/
    export_manifest.json   RankerExportInfo: model, max_hist_len, dense feature order, ...
    ranker/                SavedModel, signature serving_default:
                             user [None] int64, history [None, max_hist_len] int64 (left-padded),
                             candidate [None] int64 item index, dense [None, F] float32 raw
                             features in export_manifest's dense_features order (the model
                             standardises them)
                           -> score [None] float32 click probability, logit [None] float32

The vocabulary fingerprints (SHA-256 of vocab/items.parquet, and of
vocab/users.parquet for a model with a user embedding) let the retrieval job
refuse a data directory whose vocabularies differ from the model's, users
re-keyed under the same items included. The export directory is replaced
atomically.
"""

import dataclasses
from pathlib import Path

import numpy as np
import tensorflow as tf

from preprocess import manifest as mf
from preprocess.fileio import atomic_directory, write_json_atomic
from trainer.export_info import (EXPORT_DIR, EXPORT_MANIFEST, ITEM_EMBEDDINGS, RANKER,
                                 USER_TOWER, ExportInfo, RankerExportInfo, data_fingerprint,
                                 load_info, vocab_fingerprints)
from trainer.models import RetrievalModel

__all__ = ["EXPORT_DIR", "EXPORT_MANIFEST", "ITEM_EMBEDDINGS", "USER_TOWER", "ExportInfo",
           "data_fingerprint", "export", "export_ranker", "load_info"]


class UserTower(tf.Module):
  """The serving module: item-index history (+ user index) -> user vector."""

  def __init__(self, model: RetrievalModel, max_seq_len: int):
    super().__init__()
    self.model = model
    self.serve = tf.function(
        self._serve, input_signature=[
            tf.TensorSpec([None, max_seq_len], tf.int64, name="history"),
            tf.TensorSpec([None], tf.int64, name="user")])

  def _serve(self, history, user):
    vector = self.model.user_vector(tf.cast(history, tf.int32), tf.cast(user, tf.int32))
    return {"vector": tf.cast(vector, tf.float32)}


def input_vocabularies(model) -> tuple[str, ...]:
  """The vocabularies whose indices the model's inputs are: the items always,
  the users when the model has a user embedding."""
  return ("items",) + (("users",) if getattr(model, "user_embedding", None) is not None else ())


def export(model: RetrievalModel, model_name: str, manifest: mf.Manifest, model_dir: Path,
           global_step: int) -> Path:
  num_items = manifest.vocab_sizes["items"]
  vectors = np.concatenate([
      model.item_vectors(tf.range(b, min(b + 65536, num_items)), training=False).numpy()
      for b in range(0, num_items, 65536)]).astype(np.float32)
  vectors[0] = 0.0
  info = ExportInfo(model=model_name, emb_dim=int(vectors.shape[1]),
                    max_seq_len=manifest.max_seq_len, num_items=num_items,
                    num_users=manifest.vocab_sizes["users"], data_dir=str(manifest.data_dir),
                    data_fingerprint=data_fingerprint(manifest), global_step=global_step,
                    vocab_fingerprints=vocab_fingerprints(manifest, input_vocabularies(model)))
  target = Path(model_dir) / EXPORT_DIR
  with atomic_directory(target, overwrite=True) as tmp:
    tower = UserTower(model, manifest.max_seq_len)
    tf.saved_model.save(tower, str(tmp / USER_TOWER), signatures={"serving_default": tower.serve})
    np.save(tmp / ITEM_EMBEDDINGS, vectors)
    write_json_atomic(tmp / EXPORT_MANIFEST, dataclasses.asdict(info))
  return target


class Ranker(tf.Module):
  """The ranker's serving module: (user, history, candidate, raw dense) -> click probability."""

  def __init__(self, model, max_hist_len: int, num_dense: int):
    super().__init__()
    self.model = model
    self.serve = tf.function(
        self._serve, input_signature=[
            tf.TensorSpec([None], tf.int64, name="user"),
            tf.TensorSpec([None, max_hist_len], tf.int64, name="history"),
            tf.TensorSpec([None], tf.int64, name="candidate"),
            tf.TensorSpec([None, num_dense], tf.float32, name="dense")])

  def _serve(self, user, history, candidate, dense):
    inputs = {mf.FEATURE_USER: tf.cast(user, tf.int32),
              mf.FEATURE_HISTORY: tf.cast(history, tf.int32),
              mf.FEATURE_CANDIDATE: tf.cast(candidate, tf.int32), mf.FEATURE_DENSE: dense}
    logit = tf.cast(self.model.forward(inputs, training=False)[0], tf.float32)
    return {"score": tf.sigmoid(logit), "logit": logit}


def export_ranker(model, manifest: mf.RankingManifest, model_dir: Path, global_step: int) -> Path:
  info = RankerExportInfo(model="dien", max_hist_len=manifest.max_hist_len,
                          dense_features=tuple(manifest.dense_features),
                          num_items=manifest.vocab_sizes["items"],
                          num_users=manifest.vocab_sizes["users"], data_dir=str(manifest.data_dir),
                          data_fingerprint=data_fingerprint(manifest), global_step=global_step,
                          vocab_fingerprints=vocab_fingerprints(manifest,
                                                                input_vocabularies(model)))
  target = Path(model_dir) / EXPORT_DIR
  with atomic_directory(target, overwrite=True) as tmp:
    module = Ranker(model, manifest.max_hist_len, len(manifest.dense_features))
    tf.saved_model.save(module, str(tmp / RANKER), signatures={"serving_default": module.serve})
    write_json_atomic(tmp / EXPORT_MANIFEST, dataclasses.asdict(info))
  return target
