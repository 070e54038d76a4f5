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
