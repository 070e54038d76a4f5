import numpy as np
import pyarrow as pa
import pytest

from contracts import manifest as mf
from contracts.vocab import Vocabulary


def test_round_trip_and_unknown_ids_map_to_padding():
  vocab = Vocabulary(np.array([30, 10, 20]), name="items")
  assert vocab.size == 4  # three ids + padding row 0
  np.testing.assert_array_equal(vocab.lookup([30, 10, 20]), [1, 2, 3])
  np.testing.assert_array_equal(vocab.lookup([[20, 99], [-5, 30]]), [[3, 0], [0, 1]])
  np.testing.assert_array_equal(vocab.to_raw(vocab.lookup([10, 20, 30])), [10, 20, 30])
  assert vocab.lookup([99]).dtype == np.int32


def test_padding_and_out_of_range_indices_have_no_raw_id():
  vocab = Vocabulary(np.array([5, 6]))
  with pytest.raises(ValueError, match="index 0"):
    vocab.to_raw([1, 0])
  with pytest.raises(ValueError, match="index 3"):
    vocab.to_raw([3])


def test_duplicate_raw_ids_are_refused():
  with pytest.raises(ValueError, match="raw id 7 appears twice"):
    Vocabulary(np.array([7, 8, 7]))


def test_vocabularies_written_by_preprocess_round_trip(tiny_data):
  items = Vocabulary.from_parquet(tiny_data.path(mf.ITEMS_FILE), "item_id")
  users = Vocabulary.from_parquet(tiny_data.path(mf.USERS_FILE), "user_id")
  assert items.size == tiny_data.vocab_sizes["items"]
  assert users.size == tiny_data.vocab_sizes["users"]
  all_items = np.arange(1, items.size)
  np.testing.assert_array_equal(items.lookup(items.to_raw(all_items)), all_items)
  # Raw user ids of the tiny preset are 0..299, sorted into indices 1..300.
  np.testing.assert_array_equal(users.to_raw([1, 300]), [0, 299])


def test_string_vocabulary_lookup_labels_and_arrow_type():
  vocab = Vocabulary(np.array(["B00X", "N12", "030"], dtype=object), name="items")
  assert vocab.is_string and vocab.arrow_type == pa.string()
  assert vocab.lookup(["030", "nope", "B00X"]).tolist() == [3, 0, 1]
  assert vocab.to_arrow([2, 3]).to_pylist() == ["N12", "030"]
  # FAISS labels are int64: the indices for string ids, and they map back.
  assert vocab.faiss_labels().tolist() == [1, 2, 3]
  assert vocab.index_of_labels([[3, -1], [1, 7]]).tolist() == [[3, 0], [1, 0]]
  ints = Vocabulary(np.array([30, 10]))
  assert ints.faiss_labels().tolist() == [30, 10]
  assert ints.index_of_labels([10, -1]).tolist() == [2, 0]
  with pytest.raises(ValueError, match="raw id 'N12' appears twice"):
    Vocabulary(np.array(["N12", "N12"], dtype=object))
