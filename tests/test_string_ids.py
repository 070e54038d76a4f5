"""String ids end to end: preprocess -> trainer -> retrieval -> ranking data -> dien."""

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import small_trainer_config
from contracts import manifest as mf
from contracts.vocab import Vocabulary
from preprocess import pipeline, ranking
from retrieval import job


@pytest.fixture(scope="module")
def string_log(tiny_news_dir, tmp_path_factory):
  """The tiny log as a CSV whose users, items and categories are strings
  (Amazon-like item ids, some of them digits with a leading zero)."""
  clicks = pd.read_csv(tiny_news_dir / "train_click_log.csv")
  articles = pd.read_csv(tiny_news_dir / "articles.csv").set_index("article_id")
  log = pd.DataFrame({
      "user": "u_" + clicks.user_id.astype(str),
      # Item 7 becomes "07": not the integer 7, and not merged with anything.
      "item": np.where(clicks.click_article_id % 5 == 0,
                       "0" + clicks.click_article_id.astype(str),
                       "B0" + clicks.click_article_id.astype(str)),
      "ts": clicks.click_timestamp,
      "category": "c" + articles.category_id.reindex(clicks.click_article_id).astype(str).values,
  })
  path = tmp_path_factory.mktemp("string_log") / "log.csv"
  log.to_csv(path, index=False)
  return path, log


@pytest.fixture(scope="module")
def string_data(string_log, tmp_path_factory):
  path, _ = string_log
  out = tmp_path_factory.mktemp("string_data") / "data"
  return pipeline.run(pipeline.PreprocessConfig(
      source="csv", input=str(path), output_dir=str(out), num_shards=2, num_workers=1,
      holdout="valid_test", samples="windows", max_seq_len=8,
      csv=pipeline.readers.CsvOptions(user_col="user", item_col="item", time_col="ts",
                                      category_col="category", time_unit="ms")))


def test_vocabularies_keep_the_raw_strings(string_log, string_data):
  _, log = string_log
  items = pq.read_table(string_data.path(mf.ITEMS_FILE)).to_pandas()
  users = pq.read_table(string_data.path(mf.USERS_FILE)).to_pandas()
  assert set(items.item_id.iloc[1:]) == set(log.item)
  assert set(users.user_id.iloc[1:]) == set(log.user)
  assert string_data.source["id_types"] == {"user": "string", "item": "string",
                                            "category": "string"}
  # Each item's category is the string it had in the log.
  by_item = log.drop_duplicates("item").set_index("item").category
  assert (items.set_index("item_id").category_id.iloc[1:] == by_item.reindex(
      items.item_id.iloc[1:]).values).all()
  # Every user's history in user_histories.parquet is their clicks in time order.
  histories = pq.read_table(string_data.path(mf.USER_HISTORIES_FILE)).to_pandas()
  item_vocab = Vocabulary.from_parquet(string_data.path(mf.ITEMS_FILE), "item_id")
  one = histories.iloc[0]
  expected = log[log.user == one.user_id].sort_values("ts", kind="stable").item.tolist()
  held = 2  # valid_test holds out the last two clicks
  assert item_vocab.to_raw(np.asarray(one.history)).tolist() == expected[:-held]
  assert item_vocab.to_raw([one.valid_item, one.test_item]).tolist() == expected[-held:]


@pytest.mark.parametrize("model", ["sasrec", "two_tower"])
@pytest.mark.slow
def test_retrieval_and_ranking_data_write_the_raw_strings(string_log, string_data, tmp_path,
                                                          model):
  from trainer import ranking_eval, train_lib
  _, log = string_log
  model_dir = tmp_path / model
  train_lib.train(small_trainer_config(string_data.data_dir, model_dir, model=model,
                                       train_steps=30, eval_split="test"), string_data)
  lists = {}
  for split in ("valid", "test"):
    result = job.run(job.RetrievalConfig(
        data_dir=str(string_data.data_dir), model_dir=str(model_dir),
        output_dir=str(tmp_path / split), topk=20, eval_split=split, eval_topk=(5, 10),
        index="ivf" if split == "test" else "flat", ann_recall_users=20))
    assert result["users"] > 0
    lists[split] = pd.read_parquet(tmp_path / split / job.CANDIDATES_DIR)
    schema = pq.read_schema(next((tmp_path / split / job.CANDIDATES_DIR).glob("part-*")))
    assert schema.field("user_id").type == schema.field("item_id").type == pa.string()
    assert set(lists[split].user_id) <= set(log.user)
    assert set(lists[split].item_id) <= set(log.item)
  # The test split's IVF index labels are item indices (the ids are strings).
  info = json.loads((tmp_path / "test" / "index" / "index_info.json").read_text())
  assert info["labels"] == "item index"
  labels = pq.read_table(tmp_path / "test" / "index" / job.LABELS_FILE).to_pandas()
  items = pq.read_table(string_data.path(mf.ITEMS_FILE)).to_pandas()
  assert labels.item_id.tolist() == items.item_id.iloc[labels.label].tolist()
  # Flat metrics equal the trainer's full ranking (the same lists, whatever the id type).
  trained = json.loads((model_dir / "metrics.json").read_text())
  flat_test = job.run(job.RetrievalConfig(
      data_dir=str(string_data.data_dir), model_dir=str(model_dir),
      output_dir=str(tmp_path / "flat_test"), topk=20, eval_split="test", eval_topk=(5, 10)))
  assert flat_test["ndcg@10"] == pytest.approx(trained["ndcg@10"], abs=1e-9)
  if model != "sasrec":
    return
  data = ranking.run(ranking.RankingConfig(
      data_dir=str(string_data.data_dir), candidates=(str(tmp_path / "valid"),
                                                      str(tmp_path / "flat_test")),
      output_dir=str(tmp_path / "ranking"), max_hist_len=6, negatives_per_user=5,
      num_shards=2))
  dien_dir = tmp_path / "dien"
  train_lib.train(small_trainer_config(data.data_dir, dien_dir, model="dien", emb_dim=8,
                                       gru_units=8, mlp_units=(16,), batch_size=32,
                                       rank_eval_topk=(5, 10), train_steps=2), data)
  reranked = pd.read_parquet(dien_dir / ranking_eval.RERANKED_FILE)
  schema = pq.read_schema(dien_dir / ranking_eval.RERANKED_FILE)
  assert schema.field("user_id").type == schema.field("item_id").type == pa.string()
  assert set(reranked.user_id) <= set(log.user)
  assert set(reranked.item_id) <= set(log.item)
  # The reranked lists hold the retrieval lists' (user, item) pairs.
  pairs = set(zip(lists["test"].user_id, lists["test"].item_id)) | set(
      zip(*pd.read_parquet(tmp_path / "flat_test" / job.CANDIDATES_DIR)[
          ["user_id", "item_id"]].values.T))
  assert set(zip(reranked.user_id, reranked.item_id)) <= pairs


def _raw_signature_matches_the_index_signature(model_dir, data):
  import tensorflow as tf
  from trainer import export
  module = tf.saved_model.load(str(model_dir / "export" / "user_tower"))
  items = Vocabulary.from_parquet(data.path(mf.ITEMS_FILE), "item_id")
  users = Vocabulary.from_parquet(data.path(mf.USERS_FILE), "user_id")
  table = pq.read_table(data.path(mf.USER_HISTORIES_FILE)).slice(0, 12).to_pandas()
  length = data.max_seq_len
  rows = [np.asarray(h, np.int64)[-length:] for h in table.history]
  padded = np.zeros((len(rows), length), np.int64)
  for r, h in enumerate(rows):
    padded[r, length - len(h):] = h
  by_index = module.signatures["serving_default"](
      history=tf.constant(padded), user=tf.constant(table.user.to_numpy(np.int64)))["vector"]
  def raw(values, vocab):
    return tf.constant(np.asarray(values).tolist(), tf.string if vocab.is_string else tf.int64)

  raw_users = raw(users.to_raw(table.user.to_numpy()), users)
  # Ragged raw history, each user's whole history (longer than max_seq_len for some).
  whole = [items.to_raw(np.asarray(h, np.int64)) for h in table.history]
  ragged = module.signatures[export.RAW_RAGGED_SIGNATURE](
      history_values=raw(np.concatenate(whole), items),
      history_row_lengths=tf.constant([len(h) for h in whole], tf.int64),
      user=raw_users)["vector"]
  np.testing.assert_allclose(ragged.numpy(), by_index.numpy(), rtol=1e-5, atol=1e-6)
  # Left-padded raw history of any width, padding marked by `length`.
  width = max(len(h) for h in whole)
  fill = "" if items.is_string else 0
  dense = np.full((len(whole), width), fill, dtype=object if items.is_string else np.int64)
  for r, h in enumerate(whole):
    dense[r, width - len(h):] = h
  padded_raw = module.signatures[export.RAW_SIGNATURE](
      history=raw(dense, items), length=tf.constant([len(h) for h in whole], tf.int64),
      user=raw_users)["vector"]
  np.testing.assert_allclose(padded_raw.numpy(), by_index.numpy(), rtol=1e-5, atol=1e-6)
  # Item vectors with their raw ids, for a serving system's own index.
  vectors = pq.read_table(model_dir / "export" / export.ITEM_VECTORS)
  assert vectors.column("id").to_pylist() == items.raw_ids.tolist()
  np.testing.assert_array_equal(
      np.stack(vectors.column("vector").to_numpy(zero_copy_only=False)),
      np.load(model_dir / "export" / "item_embeddings.npy")[1:])


@pytest.mark.parametrize("model", ["sasrec", "two_tower"])
@pytest.mark.slow
def test_the_raw_id_signatures_give_the_index_signatures_vector(string_data, tmp_path, model):
  from trainer import train_lib
  model_dir = tmp_path / model
  train_lib.train(small_trainer_config(string_data.data_dir, model_dir, model=model,
                                       train_steps=3), string_data)
  _raw_signature_matches_the_index_signature(model_dir, string_data)


def test_the_raw_id_signature_takes_integer_ids_too(tiny_data, tiny_export):
  _raw_signature_matches_the_index_signature(tiny_export, tiny_data)
