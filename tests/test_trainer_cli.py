"""The trainer binary: flag errors, the model_dir lock, SIGTERM, kill -9 and resume."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import small_tmpfs

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
SMALL = ["--batch_size=16", "--emb_dim=16", "--num_blocks=1", "--ff_dim=16",
         "--tower_units=16", "--eval_topk=5,10", "--warmup_steps=1", "--nojit_compile",
         "--shuffle_buffer=256", "--steps_per_loop=1", "--log_every_steps=1",
         "--early_stopping_metric="]


def trainer(*args, timeout=180):
  return subprocess.run([sys.executable, "-m", "trainer.main", *args], capture_output=True,
                        text=True, env=ENV, timeout=timeout)


@pytest.mark.parametrize("flags,message", [
    (["--emb_dim=30", "--num_heads=4"], "--emb_dim=30 is not divisible by --num_heads=4"),
    (["--strategy=mirrored", "--num_cpu_replicas=3", "--batch_size=16"],
     "--batch_size=16 is not divisible by the 3 replicas"),
    (["--eval_split=test"], "--eval_split=test: "),
    (["--num_cpu_replicas=2"], "--num_cpu_replicas=2 needs --strategy=mirrored"),
    (["--symmetric_loss", "--num_negatives=8"], "--symmetric_loss needs the full in-batch pool"),
    (["--eval_topk=5,x"], "--eval_topk=5,x: expected integers"),
    (["--loss=softmax", "--num_negatives=8"],
     "--symmetric_loss and --num_negatives apply to --loss=in_batch only"),
    (["--loss=softmax", "--batch_size=2000000"],
     "--loss=softmax: --batch_size=2000000 gives 2000000 loss positions per step against"),
    (["--eval_topk=5,10", "--early_stopping_metric=ndcg@20"],
     "--early_stopping_metric=ndcg@20: the evaluation writes hit_rate@5, ndcg@5, recall@5, "
     "hit_rate@10"),
    (["--eval_every_epochs=0"],
     "--early_stopping_metric=ndcg@10 (patience 10) needs periodic evaluation"),
    (["--eval_every_steps=5", "--eval_every_epochs=2"],
     "--eval_every_steps=5 and --eval_every_epochs=2: set one of them"),
    (["--loss=sampled_softmax", "--num_sampled=100000"],
     "--num_sampled=100000: the catalogue has only"),
    (["--mode=eval"], "--mode=eval: "),
])
def test_inconsistent_flags_fail_with_one_line(tiny_data, tiny_news_dir, tmp_path, flags,
                                               message):
  # tiny_data has holdout=valid_test; --eval_split=test needs a holdout=last dir to fail.
  data_dir = tiny_data.data_dir
  if flags == ["--eval_split=test"]:
    from conftest import make_config
    from preprocess import pipeline
    data_dir = pipeline.run(make_config(tiny_news_dir, tmp_path / "last")).data_dir
  result = trainer(f"--data_dir={data_dir}", f"--model_dir={tmp_path / 'm'}", *flags)
  assert result.returncode == 2, result.stderr
  assert result.stderr.strip().startswith(f"trainer: error: {message}")
  assert len(result.stderr.strip().splitlines()) == 1
  assert not (tmp_path / "m").exists()


def test_a_shard_shorter_than_its_manifest_fails_before_any_step(tiny_windows, tmp_path):
  data_dir = tmp_path / "d"
  shutil.copytree(tiny_windows.data_dir, data_dir)
  shard = data_dir / tiny_windows.split("valid").shards[0].path
  shard.write_bytes(shard.read_bytes()[:-7])  # cut short, as a copy killed mid-way leaves it
  result = trainer(f"--data_dir={data_dir}", f"--model_dir={tmp_path / 'm'}", *SMALL)
  assert result.returncode == 1, result.stderr[-2000:]
  assert result.stderr.strip() == (
      f"trainer: error: {shard}: shard is {shard.stat().st_size} bytes, manifest says "
      f"{shard.stat().st_size + 7} (damaged?)")
  assert not (tmp_path / "m").exists()


def test_data_dir_without_manifest_fails_with_one_line(tmp_path):
  result = trainer(f"--data_dir={tmp_path}", f"--model_dir={tmp_path / 'm'}")
  assert result.returncode == 2
  assert result.stderr.strip() == (f"trainer: error: --data_dir: {tmp_path}: no manifest.json "
                                   "here (not a preprocess output directory?)")


def test_unknown_model_is_refused_by_the_flag_parser(tiny_data, tmp_path):
  result = trainer("--model=bert4rec", f"--data_dir={tiny_data.data_dir}",
                   f"--model_dir={tmp_path}")
  assert result.returncode != 0 and "bert4rec" in result.stderr
  assert "sasrec" in result.stderr  # the choices are named


def test_tower_units_with_dien_points_at_its_mlp_flag(tmp_path):
  result = trainer("--model=dien", "--tower_units=16", f"--data_dir={tmp_path / 'none'}",
                   f"--model_dir={tmp_path / 'm'}")
  assert result.returncode == 2
  assert result.stderr.strip() == ("trainer: error: --tower_units: dien's top MLP is "
                                   "--mlp_units (--tower_units sets the two_tower towers)")


def start(args):
  return subprocess.Popen([sys.executable, "-m", "trainer.main", *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=ENV)


def wait_for(predicate, timeout=120):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return
    time.sleep(0.2)
  raise TimeoutError("condition not reached")


def checkpoints(model_dir):
  directory = model_dir / "checkpoints"
  return sorted(int(p.name.split("-")[1].split(".")[0]) for p in directory.glob("ckpt-*.index")) \
      if directory.exists() else []


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_exits_0_and_the_rerun_resumes(tiny_windows, tmp_path):
  model_dir = tmp_path / "m"
  args = [f"--data_dir={tiny_windows.data_dir}", f"--model_dir={model_dir}", *SMALL,
          "--checkpoint_every_steps=1000", "--train_steps=100000", "--noexport"]
  proc = start(args)
  wait_for(lambda: (model_dir / "summaries").exists())
  # The same command again while the first runs: refused at once, nothing touched.
  busy = trainer(*args)
  assert busy.returncode == 1, busy.stderr[-2000:]
  assert busy.stderr.strip().startswith(
      f"trainer: error: --model_dir: {model_dir} is in use by another trainer (pid {proc.pid} on "
  ), busy.stderr
  time.sleep(2)  # a few steps in
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  assert "stopped by SIGTERM at step" in out
  step = int(out.split("at step ")[1].split(";")[0])
  assert step > 0 and checkpoints(model_dir) == [step]
  result = trainer(*[a for a in args if not a.startswith("--train_steps")],
                   f"--train_steps={step + 2}")
  assert result.returncode == 0, result.stderr[-2000:]
  assert f"at step {step}" in result.stderr  # "resumed from ... at step N"
  assert f"trainer: step {step + 2}," in result.stdout


@pytest.mark.slow
def test_kill_9_then_the_same_command_resumes_and_removes_what_the_killed_run_left(
    tiny_windows, tmp_path):
  model_dir = tmp_path / "m"
  args = [f"--data_dir={tiny_windows.data_dir}", f"--model_dir={model_dir}", *SMALL,
          "--checkpoint_every_steps=2", "--train_steps=40", "--noexport"]
  proc = start(args)
  wait_for(lambda: len(checkpoints(model_dir)) >= 2)
  proc.kill()
  proc.communicate()
  saved = checkpoints(model_dir)[-1]
  assert 0 < saved < 40
  # The killed process's autograph modules are in model_dir, not in /tmp.
  own_tmp = model_dir / ".tmp" / f"{socket.gethostname()}-{proc.pid}"
  assert list(own_tmp.glob("__autograph_generated_file*.py"))
  # What a kill -9 in the middle of a save leaves.
  (model_dir / "checkpoints" / f"ckpt-{saved + 1}_temp").mkdir()
  (model_dir / "checkpoints" / f"ckpt-{saved + 1}_temp" / "part-00000-of-00001.index").touch()
  (model_dir / ".export.tmp-dead").mkdir()
  (model_dir / ".metrics.json.tmp-dead").write_text("{")
  result = trainer(*args)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "resumed from" in result.stderr
  assert "trainer: step 40," in result.stdout
  assert checkpoints(model_dir)[-1] == 40
  assert not list(model_dir.glob("checkpoints/*_temp")) and not list(model_dir.glob(".*.tmp-*"))
  assert not (model_dir / ".tmp").exists()


def test_auto_loss_is_the_catalogue_softmax_while_its_logits_fit(tiny_windows):
  from trainer import config as config_lib
  items = tiny_windows.vocab_sizes["items"]
  positions = 16 * tiny_windows.max_seq_len
  config = config_lib.TrainerConfig(batch_size=16, loss="auto")
  assert config_lib.resolved_loss(config, tiny_windows) == "softmax"
  # One batch more than fits (positions x items > MAX_LOGITS): the in-batch pool.
  too_big = config_lib.MAX_LOGITS // (items * tiny_windows.max_seq_len) + 1
  assert positions * items <= config_lib.MAX_LOGITS
  config = config_lib.TrainerConfig(batch_size=too_big, loss="auto")
  assert config_lib.resolved_loss(config, tiny_windows) == "in_batch"
  assert config_lib.resolved_loss(config_lib.TrainerConfig(num_negatives=8, loss="auto"),
                                  tiny_windows) == "in_batch"
  assert config_lib.resolved_loss(config_lib.TrainerConfig(loss="in_batch"),
                                  tiny_windows) == "in_batch"


@pytest.mark.slow
def test_model_defaults_resolve_per_model_and_yield_to_flags():
  def parsed(*flags):
    # In a subprocess: trainer.main defines absl flags other modules also define.
    code = ("import json, sys; from trainer import main; main.FLAGS(sys.argv); "
            "print(json.dumps(main.config_from_flags().to_dict()))")
    result = subprocess.run([sys.executable, "-c", code, *flags], capture_output=True,
                            text=True, env=ENV, timeout=60, check=True)
    return json.loads(result.stdout)

  dien, sasrec = parsed("--model=dien"), parsed("--dropout=0.3", "--learning_rate=5e-4")
  # The ranker keeps its measured settings; sasrec gets the sparse recipe's
  # except where a flag says otherwise.
  assert (dien["dropout"], dien["learning_rate"], dien["lr_schedule"], dien["weight_decay"],
          dien["epochs"]) == (0.2, 1e-3, "constant", 0.0, 20)
  assert (sasrec["model"], sasrec["loss"], sasrec["dropout"], sasrec["learning_rate"],
          sasrec["lr_schedule"], sasrec["temperature"], sasrec["weight_decay"],
          sasrec["epochs"], sasrec["num_blocks"], sasrec["num_heads"]) == \
      ("sasrec", "auto", 0.3, 5e-4, "constant", 0.05, 1.0, 200, 1, 1)
  assert parsed("--weight_decay=0")["weight_decay"] == 0.0
  # Selection is on for the retrieval models, off for the ranker (no valid split).
  assert (sasrec["early_stopping_metric"], sasrec["eval_every_epochs"],
          sasrec["early_stopping_patience"]) == ("ndcg@10", 1, 10)
  assert (dien["early_stopping_metric"], dien["eval_every_epochs"]) == ("", 0)
  assert parsed("--eval_every_steps=100")["eval_every_epochs"] == 0
  assert parsed("--early_stopping_metric=")["early_stopping_metric"] == ""
  from trainer.config import TrainerConfig
  two_tower = TrainerConfig(model="two_tower")
  assert (two_tower.loss, two_tower.dropout) == ("auto", 0.0)


@pytest.mark.slow
def test_a_full_or_read_only_model_dir_is_one_line(tiny_windows, tmp_path):
  args = [f"--data_dir={tiny_windows.data_dir}", *SMALL, "--checkpoint_every_steps=2",
          "--train_steps=30", "--noexport"]
  with small_tmpfs(tmp_path / "full", "192k"):
    result = trainer(f"--model_dir={tmp_path / 'full' / 'm'}", *args)
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"trainer: error: --model_dir={tmp_path / 'full' / 'm'}: cannot write (No space left "
        "on device); the last complete checkpoint is kept, and the same command resumes from it")
    assert "Traceback" not in result.stderr
  with small_tmpfs(tmp_path / "ro", "64k", readonly=True):
    result = trainer(f"--model_dir={tmp_path / 'ro' / 'm'}", *args)
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        f"trainer: error: {tmp_path / 'ro' / 'm'}: cannot create or lock it (Read-only file "
        "system)"]


def test_mode_eval_refuses_a_metrics_file_inside_the_model_dir(tiny_export, tmp_path):
  """Written there, it would replace the run's own metrics.json: refused before
  evaluating, however the path reaches the model directory."""
  metrics = tiny_export / "metrics.json"
  trained = metrics.read_bytes()
  (tmp_path / "link").symlink_to(tiny_export, target_is_directory=True)
  (tmp_path / "file_link.json").symlink_to(metrics)
  for given, cwd in ((str(metrics), None), ("m/metrics.json", tiny_export.parent),
                     (str(tmp_path / "link" / "metrics.json"), None),
                     (str(tmp_path / "link" / "sub" / "other.json"), None),
                     ("file_link.json", tmp_path)):
    result = subprocess.run(
        [sys.executable, "-m", "trainer.main", "--mode=eval", f"--model_dir={tiny_export}",
         f"--eval_metrics_file={given}"], capture_output=True, text=True, env=ENV, timeout=180,
        cwd=cwd)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().startswith(
        f"trainer: error: --eval_metrics_file={given} is inside --model_dir={tiny_export} ")
    assert len(result.stderr.strip().splitlines()) == 1
  assert metrics.read_bytes() == trained
  assert not (tiny_export / "sub").exists()
