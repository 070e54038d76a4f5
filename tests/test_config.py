"""Config sections and the registry: which model reads which field, its defaults, its checks."""

import dataclasses
import json

import pytest

from conftest import small_trainer_config
from trainer import config as config_lib
from trainer import registry
from trainer.config import ConfigError, TrainerConfig


@pytest.mark.parametrize("model", registry.names())
def test_each_model_gives_a_default_for_every_model_dependent_field_it_reads(model):
  reads = config_lib.model_fields(model)
  wanted = {f for f in config_lib.MODEL_DEFAULT_FIELDS if f in reads}
  assert set(registry.get(model).defaults) == wanted
  config = TrainerConfig(model=model)
  assert all(getattr(config, f) is not None for f in wanted)
  # What a model does not read stays unset rather than carrying another model's value.
  assert all(getattr(config, f) is None for f in set(config_lib.MODEL_DEFAULT_FIELDS) - reads)


def test_sections_partition_the_fields_and_the_flags_follow_them():
  sections = (*config_lib.SHARED_SECTIONS, *config_lib.SECTIONS.values())
  names = [f.name for s in sections for f in dataclasses.fields(s)]
  assert len(names) == len(set(names))  # no field in two sections
  assert set(names) == set(TrainerConfig.__dataclass_fields__)
  assert all(f.metadata.get("help") for f in dataclasses.fields(TrainerConfig))


def test_dien_carries_no_retrieval_loss_and_reads_its_own_mlp():
  dien = TrainerConfig(model="dien")
  assert dien.loss is None and dien.temperature is None and dien.ff_dim is None
  assert dien.reads("mlp_units") and not dien.reads("tower_units")
  assert TrainerConfig(model="two_tower").reads("tower_units")
  assert not TrainerConfig(model="two_tower").reads("num_heads")


def test_a_saved_dien_config_with_tower_units_reads_them_as_its_mlp():
  saved = dataclasses.asdict(TrainerConfig(model="dien"))
  del saved["mlp_units"]
  saved["tower_units"] = [32, 16]
  assert TrainerConfig.from_dict(json.loads(json.dumps(saved))).mlp_units == (32, 16)


def test_model_checks_run_only_for_the_model_that_reads_the_field(tiny_data, tmp_path):
  # emb_dim 16 over 3 heads: sasrec's attention cannot split it; two_tower has no heads.
  with pytest.raises(ConfigError, match="--emb_dim=16 is not divisible by --num_heads=3"):
    config_lib.validate(small_trainer_config(tiny_data.data_dir, tmp_path / "a", num_heads=3))
  config_lib.validate(small_trainer_config(tiny_data.data_dir, tmp_path / "b",
                                           model="two_tower", num_heads=3))
  with pytest.raises(ConfigError, match="--tower_units=0: units must be >= 1"):
    config_lib.validate(small_trainer_config(tiny_data.data_dir, tmp_path / "c",
                                             model="two_tower", tower_units=(0,)))


def test_an_unknown_model_names_the_choices():
  with pytest.raises(ConfigError, match="--model='bert4rec': choose from sasrec, gru4rec"):
    registry.get("bert4rec")


def test_the_model_dirs_data_is_recognised_by_its_vocabularies_not_its_path(tiny_news_dir,
                                                                            tmp_path):
  """A data directory rebuilt in place with another catalogue is refused before
  anything is built, naming the vocabulary and both sizes; the same data
  behind another path is accepted."""
  from conftest import make_config
  from preprocess import pipeline
  data = tmp_path / "data"
  first = pipeline.run(make_config(tiny_news_dir, data, max_seq_len=8))
  config = small_trainer_config(data, tmp_path / "m")
  config_lib.save(config, first)  # what the first run records
  (tmp_path / "link").symlink_to(data, target_is_directory=True)
  config_lib.validate(dataclasses.replace(config, data_dir=str(tmp_path / "link")))

  rebuilt = pipeline.run(make_config(tiny_news_dir, data, max_seq_len=8, min_item_clicks=3,
                                     overwrite=True))
  old_items, new_items = first.vocab_sizes["items"] - 1, rebuilt.vocab_sizes["items"] - 1
  assert new_items < old_items
  for data_dir in (data, tmp_path / "link"):
    with pytest.raises(ConfigError) as refused:
      config_lib.validate(dataclasses.replace(config, data_dir=str(data_dir)))
    assert str(refused.value) == (
        f"--data_dir={data_dir}: its items vocabulary differs from the one the checkpoints in "
        f"{tmp_path / 'm'} were trained on ({data}): {old_items} items then, {new_items} now "
        "(SHA-256 differs; use another --model_dir)")


def test_a_model_dir_without_recorded_vocabularies_still_compares_the_data_path(tiny_data,
                                                                                 tmp_path):
  config = small_trainer_config(tiny_data.data_dir, tmp_path / "m")
  (tmp_path / "m").mkdir()
  (tmp_path / "m" / "trainer_config.json").write_text(json.dumps(config.to_dict()))
  config_lib.validate(config)
  (tmp_path / "link").symlink_to(tiny_data.data_dir, target_is_directory=True)
  with pytest.raises(ConfigError, match=r"--data_dir=.*link differs from .* the checkpoints"):
    config_lib.validate(dataclasses.replace(config, data_dir=str(tmp_path / "link")))
