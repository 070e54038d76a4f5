"""The numpy Example encoder and TFRecord framing against TensorFlow's reader."""

import numpy as np
import pytest
import tensorflow as tf

from preprocess import tfrecord_writer as tw


def test_varint_sizes_at_boundaries():
  values = np.array([0, 127, 128, 16383, 16384, 2**21 - 1, 2**21, 2**63 - 1])
  assert tw.varint_sizes(values).tolist() == [1, 1, 2, 2, 3, 3, 4, 9]


def test_encode_varint_rows_matches_protobuf_varints():
  # 300 = 0b10_0101100 -> 0xAC 0x02 (low 7 bits first, continuation bit set).
  buf, off = tw.encode_varint_rows(np.array([[1, 300], [0, 2**14]]))
  assert buf.tobytes() == bytes([0x01, 0xAC, 0x02, 0x00, 0x80, 0x80, 0x01])
  assert off.tolist() == [0, 3, 7]


def test_crc32c_known_value():
  # The CRC-32C check value of "123456789" is 0xE3069283 (RFC 3720 appendix).
  data = np.frombuffer(b"123456789", dtype=np.uint8)
  assert tw.crc32c(data, np.array([0]), np.array([9]))[0] == 0xE3069283
  two = np.frombuffer(b"123456789" + b"a", dtype=np.uint8)
  crc = tw.crc32c(two, np.array([0, 9, 9]), np.array([9, 0, 1]))
  assert crc[0] == 0xE3069283 and crc[1] == 0  # empty row: CRC-32C of nothing is 0
  assert crc[2] == 0xC1D04330  # CRC-32C of b"a"


def random_features(rng, n, width):
  return {
      "history": rng.integers(0, 2**21, size=(n, width)),
      "user": rng.integers(0, 2**40, size=n),
      "big": rng.integers(2**60, 2**63 - 1, size=n, dtype=np.int64),
      "zero": np.zeros(n, dtype=np.int64),
  }


def test_examples_parse_to_the_same_protos_as_tensorflow_builds():
  rng = np.random.default_rng(0)
  features = random_features(rng, 20, 7)
  buf, off = tw.encode_examples(features)
  for i in range(20):
    expected = tf.train.Example(features=tf.train.Features(feature={
        name: tf.train.Feature(int64_list=tf.train.Int64List(
            value=np.atleast_1d(values[i]).tolist()))
        for name, values in features.items()}))
    assert tf.train.Example.FromString(buf[off[i]:off[i + 1]].tobytes()) == expected


def mixed_features(rng, n):
  scores = rng.normal(size=n).astype(np.float32) * 1e3
  scores[:3] = [0.0, -0.0, -3.4e38]  # zeros' sign and the float32 extremes survive
  return {
      "history": rng.integers(0, 2**21, size=(n, 4)),
      "score": scores,
      "embedding": rng.normal(size=(n, 3)) * 1e30,  # float64 input: written as float32
      "user": rng.integers(0, 2**40, size=n),
  }


def to_example(features, i):
  return tf.train.Example(features=tf.train.Features(feature={
      name: tf.train.Feature(float_list=tf.train.FloatList(value=np.atleast_1d(values[i])))
      if np.issubdtype(values.dtype, np.floating) else
      tf.train.Feature(int64_list=tf.train.Int64List(value=np.atleast_1d(values[i]).tolist()))
      for name, values in features.items()}))


def test_mixed_int_and_float_examples_are_the_bytes_tensorflow_serialises():
  rng = np.random.default_rng(2)
  features = mixed_features(rng, 20)
  buf, off = tw.encode_examples(features)
  for i in range(20):
    # deterministic=True writes map entries in sorted key order, as the encoder does.
    assert buf[off[i]:off[i + 1]].tobytes() == to_example(features, i).SerializeToString(
        deterministic=True)


def test_float_features_read_back_exactly_with_tf_data(tmp_path):
  rng = np.random.default_rng(3)
  path = tmp_path / "x.tfrecord.gz"
  chunks = [mixed_features(rng, n) for n in (5, 30)]
  with tw.TFRecordFileWriter(path, "GZIP") as writer:
    for chunk in chunks:
      writer.write_examples(chunk)
    writer.close()
  spec = {"history": tf.io.FixedLenFeature([4], tf.int64),
          "score": tf.io.FixedLenFeature([], tf.float32),
          "embedding": tf.io.FixedLenFeature([3], tf.float32),
          "user": tf.io.FixedLenFeature([], tf.int64)}
  dataset = tf.data.TFRecordDataset(str(path), compression_type="GZIP")
  parsed = tf.io.parse_example(next(iter(dataset.batch(100))), spec)
  for name in spec:
    expected = np.concatenate([c[name] for c in chunks])
    if parsed[name].dtype == tf.float32:
      expected = expected.astype(np.float32)
      assert np.signbit(parsed[name].numpy()).tolist() == np.signbit(expected).tolist()
    np.testing.assert_array_equal(parsed[name].numpy(), expected)


@pytest.mark.parametrize("compression", ["GZIP", "NONE"])
def test_written_file_reads_back_with_tf_data(tmp_path, compression):
  rng = np.random.default_rng(1)
  path = tmp_path / "x.tfrecord"
  chunks = [random_features(rng, n, 5) for n in (3, 1, 40)]
  with tw.TFRecordFileWriter(path, compression) as writer:
    for chunk in chunks:
      writer.write_examples(chunk)
    writer.close()
  assert writer.num_records == 44
  assert writer.bytes_written == path.stat().st_size
  spec = {"history": tf.io.FixedLenFeature([5], tf.int64),
          "user": tf.io.FixedLenFeature([], tf.int64),
          "big": tf.io.FixedLenFeature([], tf.int64),
          "zero": tf.io.FixedLenFeature([], tf.int64)}
  dataset = tf.data.TFRecordDataset(str(path), compression_type="" if compression == "NONE"
                                    else compression)
  parsed = tf.io.parse_example(next(iter(dataset.batch(100))), spec)
  for name in spec:
    expected = np.concatenate([c[name] for c in chunks])
    np.testing.assert_array_equal(parsed[name].numpy(), expected)


def test_corrupted_record_is_detected_by_tensorflow(tmp_path):
  path = tmp_path / "x.tfrecord"
  with tw.TFRecordFileWriter(path, "NONE") as writer:
    writer.write_examples({"a": np.arange(10)})
    writer.close()
  data = bytearray(path.read_bytes())
  data[20] ^= 0xFF  # flip a byte inside the first record's payload
  path.write_bytes(bytes(data))
  with pytest.raises(tf.errors.DataLossError):
    list(tf.data.TFRecordDataset(str(path)))


def test_negative_values_are_refused():
  with pytest.raises(ValueError, match="negative"):
    tw.encode_examples({"a": np.array([1, -1])})
