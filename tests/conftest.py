"""Shared fixtures: small logs written by the tests themselves (never ../shared)."""

import dataclasses
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

from preprocess import pipeline, synthetic  # noqa: E402


@pytest.fixture(scope="session")
def tiny_news_dir(tmp_path_factory):
  """The tiny synthetic preset in the notebooks' news schema."""
  path = tmp_path_factory.mktemp("tiny") / "raw"
  synthetic.write(synthetic.PRESETS["tiny"], path)
  return path


def make_config(input_dir, output_dir, **overrides) -> pipeline.PreprocessConfig:
  base = pipeline.PreprocessConfig(source="news", input=str(input_dir),
                                   output_dir=str(output_dir), num_shards=3, num_workers=1)
  return dataclasses.replace(base, **overrides)


@pytest.fixture(scope="session")
def tiny_data(tiny_news_dir, tmp_path_factory):
  """preprocess output of the tiny log (positions, holdout=valid_test)."""
  out = tmp_path_factory.mktemp("tiny_data") / "data"
  return pipeline.run(make_config(tiny_news_dir, out, holdout="valid_test", max_seq_len=8))
