"""Damaged checkpoints and a damaged state file: which file, and where a run resumes."""

import logging
import os
import shutil
import subprocess
import sys

import pytest

from conftest import small_trainer_config
from trainer import checkpoints, selection, train_lib


def test_the_state_files_list_or_the_index_files_when_it_is_garbage(tmp_path):
  for n in (2, 4, 10):
    (tmp_path / f"ckpt-{n}.index").write_bytes(b"")
  (tmp_path / "ckpt-x.index").write_bytes(b"")  # not a numbered checkpoint
  state = tmp_path / "checkpoint"
  state.write_text('model_checkpoint_path: "ckpt-4"\nall_model_checkpoint_paths: "ckpt-2"\n'
                   'all_model_checkpoint_paths: "ckpt-4"\n'
                   "all_model_checkpoint_timestamps: 1796693456.308055\n"
                   "last_preserved_timestamp: 1796693455.1890106\n")
  # The state file is the record: ckpt-10 (not listed) is not the latest.
  assert checkpoints.listed(tmp_path) == checkpoints.Listing(
      [str(tmp_path / "ckpt-2"), str(tmp_path / "ckpt-4")])
  state.write_text("\x00garbage\n")
  recovered = checkpoints.listed(tmp_path)
  assert recovered.prefixes == [str(tmp_path / f"ckpt-{n}") for n in (2, 4, 10)]  # by number
  assert recovered.recovered == f"{state} is not a checkpoint state file (line 1 is " \
                                "'\\x00garbage')"
  assert selection.checkpoint_to_evaluate(tmp_path, "latest") == (str(tmp_path / "ckpt-10"), 10)
  checkpoints.write_state(tmp_path, recovered.prefixes[:2])
  assert checkpoints.listed(tmp_path) == checkpoints.Listing(recovered.prefixes[:2])
  state.unlink()
  assert checkpoints.listed(tmp_path).recovered == f"{state} is missing"


@pytest.fixture(scope="module")
def trained(tiny_windows, tmp_path_factory):
  """A model_dir with checkpoints at steps 2 and 4."""
  model_dir = tmp_path_factory.mktemp("checkpoints") / "m"
  config = small_trainer_config(tiny_windows.data_dir, model_dir, train_steps=4, export=False)
  train_lib.Trainer(config, tiny_windows).run()
  assert checkpoints.listed(model_dir / "checkpoints").prefixes == [
      str(model_dir / "checkpoints" / f"ckpt-{n}") for n in (2, 4)]
  return model_dir


def copy_of(trained, tmp_path):
  model_dir = tmp_path / "m"
  shutil.copytree(trained, model_dir)
  return model_dir


def damage(path, how):
  data = bytearray(path.read_bytes())
  if how == "cut":
    path.write_bytes(bytes(data[:len(data) * 2 // 3]))
  else:  # one byte flipped in the middle
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def restarted(model_dir, tiny_windows, **overrides):
  config = small_trainer_config(tiny_windows.data_dir, model_dir, export=False,
                                **{"train_steps": 6, **overrides})
  return train_lib.Trainer(config, tiny_windows)


@pytest.mark.parametrize("file", ["data-00000-of-00001", "index"])
@pytest.mark.parametrize("how", ["cut", "flip"])
@pytest.mark.slow
def test_a_damaged_latest_checkpoint_resumes_from_the_newest_intact_one(
    trained, tiny_windows, tmp_path, caplog, file, how):
  model_dir = copy_of(trained, tmp_path)
  damaged = model_dir / "checkpoints" / f"ckpt-4.{file}"
  damage(damaged, how)
  trainer = restarted(model_dir, tiny_windows)
  with caplog.at_level(logging.INFO, logger="absl"):
    assert trainer.restore() == 2
  said = [r.getMessage() for r in caplog.records if " is damaged (" in r.getMessage()]
  assert len(said) == 1 and said[0].startswith(f"{damaged} is damaged (")
  assert said[0].endswith(f"); resuming from {model_dir / 'checkpoints' / 'ckpt-2'} instead")
  # The state file no longer lists it: the save at step 4 replaces it.
  assert checkpoints.listed(model_dir / "checkpoints").prefixes == [
      str(model_dir / "checkpoints" / "ckpt-2")]
  assert trainer.manager.latest_checkpoint.endswith("ckpt-2")


@pytest.mark.slow
def test_a_damaged_checkpoint_is_replaced_by_the_next_save_and_training_finishes(
    trained, tiny_windows, tmp_path):
  model_dir = copy_of(trained, tmp_path)
  damage(model_dir / "checkpoints" / "ckpt-4.data-00000-of-00001", "flip")
  result = restarted(model_dir, tiny_windows).run()
  assert result.global_step == 6
  for n in (2, 4, 6):
    checkpoints.verify(str(model_dir / "checkpoints" / f"ckpt-{n}"))  # ckpt-4 rewritten


@pytest.mark.slow
def test_no_intact_checkpoint_is_one_error_naming_the_damaged_files(trained, tiny_windows,
                                                                   tmp_path):
  model_dir = copy_of(trained, tmp_path)
  folder = model_dir / "checkpoints"
  damage(folder / "ckpt-4.index", "cut")
  damage(folder / "ckpt-2.data-00000-of-00001", "flip")
  with pytest.raises(train_lib.TrainingError) as error:
    restarted(model_dir, tiny_windows).restore()
  message = str(error.value)
  assert message.startswith(f"no intact checkpoint to resume from: {folder / 'ckpt-4.index'} "
                            "is damaged (")
  assert f"; {folder / 'ckpt-2.data-00000-of-00001'} is damaged (" in message
  assert "Checksum does not match" in message and len(message.splitlines()) == 1


@pytest.mark.slow
def test_a_garbage_state_file_resumes_from_the_index_files_not_step_0(trained, tiny_windows,
                                                                     tmp_path, caplog):
  model_dir = copy_of(trained, tmp_path)
  state = model_dir / "checkpoints" / "checkpoint"
  state.write_text("this is not a checkpoint state\n")
  trainer = restarted(model_dir, tiny_windows)
  with caplog.at_level(logging.INFO, logger="absl"):
    assert trainer.restore() == 4
  assert f"{state} is not a checkpoint state file (line 1 is 'this is not a checkpoint " \
         "state'); recovered the checkpoint list from the ckpt-N.index files: ckpt-2, ckpt-4" \
         in caplog.text
  assert checkpoints.listed(model_dir / "checkpoints") == checkpoints.Listing(
      [str(model_dir / "checkpoints" / f"ckpt-{n}") for n in (2, 4)])  # a state file again
  # Without any checkpoint beside it: one error, not a run from step 0.
  for path in (model_dir / "checkpoints").glob("ckpt-*"):
    path.unlink()
  state.write_text("garbage\n")
  with pytest.raises(train_lib.TrainingError, match=r"is not a checkpoint state file .*, and "
                     r"no ckpt-N.index file is beside it; remove it to train from step 0"):
    restarted(model_dir, tiny_windows).restore()


@pytest.mark.slow
def test_mode_eval_of_a_damaged_checkpoint_is_one_line_naming_the_file(trained, tmp_path):
  model_dir = copy_of(trained, tmp_path)
  damaged = model_dir / "checkpoints" / "ckpt-4.data-00000-of-00001"
  damage(damaged, "cut")
  result = subprocess.run([sys.executable, "-m", "trainer.main", "--mode=eval",
                           f"--model_dir={model_dir}"], capture_output=True, text=True,
                          timeout=180, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
  assert result.returncode == 1, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      f"trainer: error: --mode=eval: {damaged} is damaged (Read less "
      "bytes than requested)")


@pytest.mark.slow
def test_under_selection_a_damaged_evaluation_checkpoint_is_retrained_to_the_same_best(
    tiny_windows, tmp_path, monkeypatch):
  """best/ (step 4) is newer than the checkpoint resumed from (step 2): the
  evaluation at step 4 is repeated and keeps the same best."""
  from test_selection import scripted_evaluations
  config = small_trainer_config(tiny_windows.data_dir, tmp_path / "m", train_steps=4,
                                early_stopping_metric="ndcg@10", early_stopping_patience=0,
                                eval_every_steps=2, eval_max_users=50, export=False)
  scripted_evaluations(monkeypatch, [0.1, 0.4])  # steps 2 and 4: the best is step 4
  train_lib.Trainer(config, tiny_windows).run()
  damage(tmp_path / "m" / "checkpoints" / "ckpt-4.data-00000-of-00001", "flip")
  monkeypatch.undo()
  scripted_evaluations(monkeypatch, [0.4])  # step 4 again
  result = train_lib.Trainer(config, tiny_windows).run()
  assert result.global_step == 4 and result.metrics["global_step"] == 4
  assert [e["step"] for e in result.metrics["selection"]["curve"]] == [2, 4]
  checkpoints.verify(str(tmp_path / "m" / "checkpoints" / "ckpt-4"))
