"""tools/run_recipe.py: a recipe runs end to end with 2 seeds on the tiny log."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import run_recipe  # noqa: E402

PREPROCESS = ("--source=news --input=$DATA/raw --holdout=valid_test --samples=windows "
              "--max_seq_len=8 --num_shards=2")
RECIPE = "# tiny recipe for the test\n# preprocess: " + PREPROCESS + """
--model=sasrec
--loss=softmax
--batch_size=16
--emb_dim=16
--num_blocks=1
--ff_dim=16
--train_steps=4
--steps_per_loop=2
--warmup_steps=1
--eval_topk=5,10
--nojit_compile
--noexport
"""


def run_tool(*args):
  return subprocess.run([sys.executable, str(ROOT / "tools" / "run_recipe.py"), *args],
                        capture_output=True, text=True, cwd=ROOT)


def run_tiny_recipe(tiny_news_dir, work, seeds, metrics, header=""):
  """The tiny RECIPE through the tool; the recipe file sits beside `work`."""
  recipe = work.parent / "tiny.flags"
  recipe.write_text(header + RECIPE)
  return run_tool(f"--recipe={recipe}", f"--seeds={seeds}", f"--work_dir={work}",
                  f"--data_root={tiny_news_dir.parent}", f"--metrics={metrics}")


@pytest.fixture(scope="module")
def trained_seed(tiny_news_dir, tmp_path_factory):
  """A work dir with the tiny recipe's seed 1 trained; copy it (copy_work) to use it."""
  work = tmp_path_factory.mktemp("recipe") / "work"
  result = run_tiny_recipe(tiny_news_dir, work, "1", "hit_rate@10,ndcg@10")
  assert result.returncode == 0, result.stderr[-3000:]
  return work


def copy_work(work, tmp_path):
  """A copy of a work dir without its summary: a rerun reuses the trained seeds."""
  copy = tmp_path / "work"
  shutil.copytree(work, copy)
  (copy / "summary.json").unlink()
  return copy


@pytest.mark.slow
def test_two_seeds_give_valid_and_test_metrics_and_their_mean(tiny_news_dir, tmp_path):
  work = tmp_path / "work"
  result = run_tiny_recipe(tiny_news_dir, work, "1,2", "hit_rate@10,ndcg@10")
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads((work / "summary.json").read_text())
  assert summary["seeds"] == [1, 2]
  for split in ("valid", "test"):
    per_seed = [json.loads((work / f"seed_{s}" / "metrics.json").read_text())["by_split"][split]
                for s in (1, 2)]
    values = [m["ndcg@10"] for m in per_seed]
    assert summary["splits"][split]["ndcg@10"]["values"] == values
    assert summary["splits"][split]["ndcg@10"]["mean"] == pytest.approx(np.mean(values))
    assert per_seed[0]["split"] == split and per_seed[0]["num_users"] > 0
  config = json.loads((work / "seed_2" / "trainer_config.json").read_text())
  assert config["seed"] == 2 and config["loss"] == "softmax" and config["train_steps"] == 4
  assert "mean±sd" in result.stdout
  # A second call reuses the data and the finished seeds: nothing is rerun.
  again = run_tiny_recipe(tiny_news_dir, work, "1,2", "hit_rate@10,ndcg@10")
  assert again.returncode == 0 and "$ " not in again.stdout


@pytest.mark.slow
def test_also_evaluate_scores_the_same_checkpoints_with_the_other_protocol(tiny_news_dir,
                                                                           tmp_path):
  work = tmp_path / "work"
  result = run_tiny_recipe(tiny_news_dir, work, "1", "hit_rate@5,ndcg@5",
                           header="# also evaluate: --eval_negatives=5\n")
  assert result.returncode == 0, result.stderr[-3000:]
  trained = json.loads((work / "seed_1" / "metrics.json").read_text())
  also = json.loads((work / "seed_1_also.json").read_text())
  # --mode=eval scored the step the run exported and trained nothing.
  assert also["global_step"] == trained["global_step"] == 4
  assert json.loads((work / "seed_1" / "metrics.json").read_text()) == trained
  assert trained["protocol"] == "full" and also["protocol"] == "sampled_5"
  # Among 5 sampled items the target can only rank higher than among all of
  # them, so each user's hit at 5 under the full protocol is one here too.
  for split in ("valid", "test"):
    assert also["by_split"][split]["hit_rate@5"] >= trained["by_split"][split]["hit_rate@5"]
  summary = json.loads((work / "summary.json").read_text())
  assert summary["also_evaluated"]["flags"] == ["--eval_negatives=5"]
  assert summary["also_evaluated"]["splits"]["test"]["ndcg@5"]["values"] == \
      [also["by_split"]["test"]["ndcg@5"]]
  assert summary["splits"]["test"]["ndcg@5"]["values"] == [trained["by_split"]["test"]["ndcg@5"]]
  assert "also evaluated (--eval_negatives=5)" in result.stdout


@pytest.mark.slow
def test_a_failed_second_evaluation_names_its_log_and_leaves_no_file(tiny_news_dir, trained_seed,
                                                                     tmp_path):
  work = copy_work(trained_seed, tmp_path)  # seed 1 is not trained again
  result = run_tiny_recipe(tiny_news_dir, work, "1", "hit_rate@5",
                           header="# also evaluate: --eval_negatives=-1\n")
  assert result.returncode != 0
  assert f"log {work / 'seed_1_also.log'}" in result.stderr
  assert "--eval_negatives=-1" in result.stderr
  # The trained seed stays (a rerun reuses it); no evaluation file, no summary.
  assert (work / "seed_1" / "metrics.json").is_file()
  assert not (work / "seed_1_also.json").exists() and not (work / "summary.json").exists()


def test_preprocess_flag_replaces_the_recipes_data_line(tmp_path):
  recipe = tmp_path / "r.flags"
  recipe.write_text("# preprocess: --source=news --input=$DATA/a\n--model=sasrec\n")
  assert run_recipe.preprocess_flags(recipe, "/d") == ["--source=news", "--input=/d/a"]
  assert run_recipe.preprocess_flags(recipe, "/d", "--source=sasrec_txt --input=$DATA/y") == \
      ["--source=sasrec_txt", "--input=/d/y"]
  with pytest.raises(run_recipe.RecipeError, match="--preprocess: --overwrite is set by"):
    run_recipe.preprocess_flags(recipe, "/d", "--source=news --overwrite")


def test_two_also_evaluate_lines_are_refused_before_any_work(tmp_path):
  recipe = tmp_path / "two.flags"
  recipe.write_text("# preprocess: --source=news\n# also evaluate: --eval_negatives=5\n"
                    "# also evaluate: --eval_negatives=100\n--model=sasrec\n")
  result = run_tool(f"--recipe={recipe}", f"--work_dir={tmp_path / 'w'}")
  assert result.returncode != 0
  assert f"{recipe}: at most one '# also evaluate: FLAGS' line, found 2" in result.stderr
  assert not (tmp_path / "w").exists()


def test_a_recipe_without_its_preprocess_line_is_refused(tmp_path):
  recipe = tmp_path / "bad.flags"
  recipe.write_text("--model=sasrec\n")
  result = run_tool(f"--recipe={recipe}", f"--work_dir={tmp_path / 'w'}")
  assert result.returncode != 0
  assert f"{recipe}: needs exactly one '# preprocess: FLAGS' line, found 0" in result.stderr
  assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_an_unknown_metric_is_named_and_no_summary_is_written(tiny_news_dir, trained_seed,
                                                             tmp_path):
  work = copy_work(trained_seed, tmp_path)  # seed 1 is not trained again
  result = run_tiny_recipe(tiny_news_dir, work, "1", "hit_rate@100")
  assert result.returncode != 0
  assert "run_recipe: --metrics: 'hit_rate@100' is not among the valid metrics of seed 1" in \
      result.stderr
  assert not (work / "summary.json").exists()


def test_summary_mean_and_sample_spread_by_hand():
  # ndcg values 0.1 and 0.3: mean 0.2, sample sd sqrt(((-.1)^2 + .1^2) / 1) = 0.1414214.
  runs = {s: {"by_split": {"test": {"ndcg@10": v}}, "train_seconds": t}
          for s, v, t in ((1, 0.1, 10.0), (2, 0.3, 30.0))}
  summary = run_recipe.summarize(runs, ["ndcg@10"])
  assert summary["splits"]["test"]["ndcg@10"]["mean"] == pytest.approx(0.2)
  assert summary["splits"]["test"]["ndcg@10"]["std"] == pytest.approx(0.1414214, abs=1e-7)
  assert summary["train_seconds"]["mean"] == pytest.approx(20.0)


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs").glob("*.flags")),
                         ids=lambda p: p.name)
def test_checked_in_recipes_parse(recipe, tmp_path):
  """Every flag of a checked-in recipe is a trainer flag, and its header names its data."""
  assert run_recipe.preprocess_flags(recipe, "/data")[0].startswith("--source=")
  result = subprocess.run([sys.executable, "-m", "trainer.main", f"--flagfile={recipe}",
                           f"--data_dir={tmp_path / 'none'}", f"--model_dir={tmp_path / 'm'}"],
                          capture_output=True, text=True, cwd=ROOT)
  # The flags parsed; only the (absent) data stops it.
  assert result.returncode == 2
  assert result.stderr.strip().startswith("trainer: error: --data_dir: "), result.stderr
