"""The trainer's export: what the retrieval job (and serving) loads.

  model_dir/export/
    export_manifest.json   this module's ExportInfo: model, sizes, vocabulary fingerprints
    user_tower/            SavedModel, signature serving_default:
                             history [None, max_seq_len] int64 item indices (0 = padding,
                               left-padded, latest click last)
                             user    [None] int64 user index (ignored by sasrec)
                           -> vector [None, emb_dim] float32, L2-normalised
                           and the same vector from raw ids (string or int64, the
                           vocabularies' type; the vocabularies are inside, unknown -> 0):
                             serving_raw: history [None, None] raw ids, length [None]
                               (the real clicks are the last `length` of the row), user [None]
                             serving_raw_ragged: history_values [None] raw ids,
                               history_row_lengths [None], user [None]
                           Inputs that disagree fail with InvalidArgumentError: rows of
                           history vs length vs user (one per row; sasrec's may be empty),
                           0 <= length <= history width, sum(history_row_lengths) ==
                           len(history_values).
    item_vectors.parquet   id (raw item id), vector (float32 x emb_dim): for an index of your own
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
import pyarrow as pa
import pyarrow.parquet as pq
import tensorflow as tf

from contracts import manifest as mf
from contracts.fileio import atomic_directory, write_json_atomic
from contracts.vocab import Vocabulary
from contracts.export_manifest import (EXPORT_DIR, EXPORT_MANIFEST, ITEM_EMBEDDINGS, RANKER,
                                 USER_TOWER, ExportInfo, RankerExportInfo, data_fingerprint,
                                 load_info, vocab_fingerprints)
from trainer.models import RetrievalModel

__all__ = ["EXPORT_DIR", "EXPORT_MANIFEST", "ITEM_EMBEDDINGS", "USER_TOWER", "ExportInfo",
           "data_fingerprint", "export", "export_ranker", "load_info"]


def _lookup_table(vocab: Vocabulary) -> tf.lookup.StaticHashTable:
  """Raw id -> index (1..n), unknown -> 0: the vocabulary inside the SavedModel."""
  dtype = tf.string if vocab.is_string else tf.int64
  keys = tf.constant(vocab.raw_ids.astype(str) if vocab.is_string else vocab.raw_ids, dtype)
  return tf.lookup.StaticHashTable(
      tf.lookup.KeyValueTensorInitializer(keys, tf.range(1, vocab.size, dtype=tf.int64)),
      default_value=tf.constant(0, tf.int64))


class UserTower(tf.Module):
  """The serving module: item-index history (+ user index) -> user vector, and
  the same from raw ids (RAW_SIGNATURE, RAW_RAGGED_SIGNATURE)."""

  def __init__(self, model: RetrievalModel, max_seq_len: int, items: Vocabulary,
               users: Vocabulary):
    super().__init__()
    self.model = model
    self.max_seq_len = max_seq_len
    self.item_table, self.user_table = _lookup_table(items), _lookup_table(users)
    # A model without a user embedding ignores `user`: it may then be empty.
    self.reads_user = getattr(model, "user_embedding", None) is not None
    item_dtype = tf.string if items.is_string else tf.int64
    user_dtype = tf.string if users.is_string else tf.int64
    self.serve = tf.function(
        self._serve, input_signature=[
            tf.TensorSpec([None, max_seq_len], tf.int64, name="history"),
            tf.TensorSpec([None], tf.int64, name="user")])
    self.serve_raw = tf.function(
        self._serve_raw, input_signature=[
            tf.TensorSpec([None, None], item_dtype, name="history"),
            tf.TensorSpec([None], tf.int64, name="length"),
            tf.TensorSpec([None], user_dtype, name="user")])
    self.serve_raw_ragged = tf.function(
        self._serve_raw_ragged, input_signature=[
            tf.TensorSpec([None], item_dtype, name="history_values"),
            tf.TensorSpec([None], tf.int64, name="history_row_lengths"),
            tf.TensorSpec([None], user_dtype, name="user")])

  def _check_users(self, signature: str, rows, user) -> None:
    """`user` holds one id per row (or none, for a model that ignores it)."""
    users = tf.shape(user, out_type=tf.int64)[0]
    agree = tf.equal(users, rows)
    if not self.reads_user:
      agree = tf.logical_or(agree, tf.equal(users, 0))
    tf.debugging.assert_equal(
        agree, True, message=f"{signature}: `user` must have one id per row of the history"
        + ("" if self.reads_user else " (or none)"))

  def _serve(self, history, user):
    self._check_users("serving_default", tf.shape(history, out_type=tf.int64)[0], user)
    return self._vector(history, user)

  def _vector(self, history, user):
    vector = self.model.user_vector(tf.cast(history, tf.int32), tf.cast(user, tf.int32))
    return {"vector": tf.cast(vector, tf.float32)}

  def _serve_raw(self, history, length, user):
    # The last `length` columns of each row are its clicks, latest last.
    rows = tf.shape(history, out_type=tf.int64)[0]
    width = tf.shape(history, out_type=tf.int64)[1]
    tf.debugging.assert_equal(tf.shape(length, out_type=tf.int64)[0], rows, message=(
        f"{RAW_SIGNATURE}: `length` must have one entry per row of `history`"))
    tf.debugging.assert_non_negative(length, message=f"{RAW_SIGNATURE}: `length` must be >= 0")
    tf.debugging.assert_less_equal(length, width, message=(
        f"{RAW_SIGNATURE}: `length` must be <= the width of `history`"))
    self._check_users(RAW_SIGNATURE, rows, user)
    real = tf.range(width)[None, :] >= (width - length)[:, None]
    return self._raw_ragged(tf.boolean_mask(history, real), length, user)

  def _serve_raw_ragged(self, history_values, history_row_lengths, user):
    tf.debugging.assert_non_negative(history_row_lengths, message=(
        f"{RAW_RAGGED_SIGNATURE}: `history_row_lengths` must be >= 0"))
    tf.debugging.assert_equal(
        tf.reduce_sum(history_row_lengths), tf.shape(history_values, out_type=tf.int64)[0],
        message=f"{RAW_RAGGED_SIGNATURE}: `history_row_lengths` must add up to the number of "
        "`history_values`")
    self._check_users(RAW_RAGGED_SIGNATURE,
                      tf.shape(history_row_lengths, out_type=tf.int64)[0], user)
    return self._raw_ragged(history_values, history_row_lengths, user)

  def _raw_ragged(self, history_values, history_row_lengths, user):
    ragged = tf.RaggedTensor.from_row_lengths(self.item_table.lookup(history_values),
                                              history_row_lengths)
    # Left-pad to max_seq_len keeping the latest clicks: reverse, pad right, reverse.
    reversed_rows = tf.reverse(ragged, axis=[1]).to_tensor(
        default_value=0, shape=[None, self.max_seq_len])
    history = tf.reverse(reversed_rows, axis=[1])
    return self._vector(history, self.user_table.lookup(user))


RAW_SIGNATURE = "serving_raw"  # history [None, None] raw ids, length [None], user [None] raw id
RAW_RAGGED_SIGNATURE = "serving_raw_ragged"  # history_values, history_row_lengths, user
ITEM_VECTORS = "item_vectors.parquet"  # id (raw), vector (float32 list): build your own index


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
  items = Vocabulary.from_parquet(manifest.path(mf.ITEMS_FILE), "item_id")
  users = Vocabulary.from_parquet(manifest.path(mf.USERS_FILE), "user_id")
  with atomic_directory(target, overwrite=True) as tmp:
    tower = UserTower(model, manifest.max_seq_len, items, users)
    tf.saved_model.save(tower, str(tmp / USER_TOWER), signatures={
        "serving_default": tower.serve, RAW_SIGNATURE: tower.serve_raw,
        RAW_RAGGED_SIGNATURE: tower.serve_raw_ragged})
    np.save(tmp / ITEM_EMBEDDINGS, vectors)
    pq.write_table(pa.table({
        "id": items.to_arrow(np.arange(1, items.size)),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors[1:].reshape(-1)),
                                                    vectors.shape[1])}), tmp / ITEM_VECTORS)
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


def export_ranker(model, model_name: str, manifest: mf.RankingManifest, model_dir: Path,
                  global_step: int) -> Path:
  info = RankerExportInfo(model=model_name, max_hist_len=manifest.max_hist_len,
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
