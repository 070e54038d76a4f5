"""preprocess: raw click logs -> vocabularies + sharded TFRecords + manifest.

  preprocess --source=news --input=DIR --output_dir=OUT
  preprocess --source=sasrec_txt --input=ml-1m.txt.gz --output_dir=OUT --holdout=valid_test
  preprocess --source=movielens --input=ratings.dat --output_dir=OUT
  preprocess --source=csv --input=log.csv --user_col=u --item_col=i --time_col=t --output_dir=OUT
  preprocess --source=sequences --input=Yelp.txt --output_dir=OUT    # `user item1 item2 ...`
  preprocess --source=recbole --input=ml-1m.inter --output_dir=OUT   # RecBole atomic file
  preprocess --source=jsonl --input=reviews.json.gz --user_col=reviewerID --item_col=asin \
      --time_col=unixReviewTime --output_dir=OUT                     # JSON lines

  preprocess --mode=ranking --data_dir=OUT --candidates=CANDS_VALID,CANDS_TEST \
      --output_dir=RANK_OUT          # retrieval candidates -> ranking examples (ranking.py)

See contracts/manifest.py for what OUT and RANK_OUT contain.
"""


from absl import app, flags, logging

from contracts import cli
from contracts import manifest as mf
from contracts.errors import ConfigError, DataError
from preprocess import pipeline, ranking, readers

FLAGS = flags.FLAGS
_R = ranking.RankingConfig(data_dir="", candidates=(), output_dir="")
flags.DEFINE_enum("mode", "sequences", ["sequences", "ranking"],
                  "sequences: click log -> sequence examples; ranking: retrieval candidates -> "
                  "ranking examples for --model=dien.")
flags.DEFINE_enum("source", None, readers.SOURCES, "Input format.")
flags.DEFINE_string("input", None, "news: directory with train_click_log.csv and articles.csv; "
                    "others: the log file (.gz accepted; csv source also reads .parquet).")
flags.DEFINE_string("output_dir", None, "Output directory (written atomically).")
flags.DEFINE_boolean("overwrite", False, "Replace a non-empty --output_dir.")
flags.DEFINE_integer("max_seq_len", 50, "History length of every example (left-padded).")
flags.DEFINE_enum("samples", "positions", mf.SAMPLES,
                  "positions: one example per next-item target (the notebooks); windows: "
                  "non-overlapping windows, every click a target once (SASRec all-position loss).")
flags.DEFINE_integer("max_samples_per_user", 0,
                     "Keep at most this many most recent training examples per user (0: all).")
flags.DEFINE_enum("holdout", "last", list(mf.HOLDOUT_SPLITS),
                  "last: last click is validation (the notebooks); valid_test: second-to-last "
                  "validation, last test (published full-ranking protocol).")
flags.DEFINE_integer("min_user_clicks", 0, "Drop users with fewer clicks (after the item filter).")
flags.DEFINE_integer("min_item_clicks", 0, "Drop items with fewer clicks (applied first).")
flags.DEFINE_integer("num_shards", 8, "TFRecord shards per split (fewer if fewer examples).")
flags.DEFINE_enum("compression", "GZIP", list(mf.COMPRESSIONS), "TFRecord compression.")
flags.DEFINE_integer("seed", 42, "Seed of the training example shuffle.")
flags.DEFINE_integer("num_workers", 0, "Processes writing shards in parallel (0: one per CPU "
                     "core); the output does not depend on it.")
cli.define_engine_flags("this process (forked shard writers)",
                        "Ray Data operations on a Ray cluster, for logs larger than one "
                        "machine's memory (--source=csv or news)")
flags.DEFINE_integer("ray_partitions", 0, "--engine=ray: user partitions, each cleaned by one "
                     "task (0: one per 32 MB of input).")
flags.DEFINE_integer("ray_object_store_bytes", 0, "--engine=ray with a local Ray: its object "
                     "store size (0: Ray's default); beyond it, blocks spill to disk.")
flags.DEFINE_string("movies", "", "movielens: movies.dat for categories (default: next to "
                    "the ratings file, if present).")
flags.DEFINE_string("user_col", "", "csv, jsonl, recbole: user id column (recbole: user_id).")
flags.DEFINE_string("item_col", "", "csv, jsonl, recbole: item id column (recbole: item_id).")
flags.DEFINE_string("time_col", "", "csv, jsonl, recbole: time column (integer or date; "
                    "recbole: timestamp); empty: row order.")
flags.DEFINE_string("category_col", "", "csv, jsonl, recbole: optional item category column.")
flags.DEFINE_string("delimiter", ",", "csv: field delimiter ('\\t' or 'tab' for tabs).")
flags.DEFINE_list("column_names", [], "csv: column names for a file without a header line.")
flags.DEFINE_enum("time_unit", "s", list(readers.TIME_UNITS),
                  "csv, jsonl, recbole: unit of --time_col.")
flags.DEFINE_string("time_format", "", "csv, jsonl: strftime format of a date --time_col (e.g. "
                    "%d/%m/%Y); empty: ISO 8601 or one format inferred from the whole column, "
                    "refused when day/month order cannot be told.")
flags.DEFINE_string("data_dir", None, "ranking: the preprocess output the candidates came from.")
flags.DEFINE_list("candidates", [], "ranking: retrieval output directories; --holdout=valid_test "
                  "data needs the valid and the test lists, --holdout=last the valid lists.")
flags.DEFINE_string("item_embeddings", _R.item_embeddings,
                    "ranking: trainer model_dir (its export) or .npy of item embeddings for "
                    "emb_sim_last (default: the model the retrieval job used).")
flags.DEFINE_integer("max_hist_len", _R.max_hist_len, "ranking: history length (left-padded).")
flags.DEFINE_integer("negatives_per_user", _R.negatives_per_user,
                     "ranking: random negatives kept per training user (0: all); evaluation "
                     "keeps every candidate.")
flags.DEFINE_enum("negative_sampling", _R.negative_sampling, list(ranking.NEGATIVE_SAMPLING),
                  "ranking: which negatives a training user keeps: random, top (the best-ranked "
                  "by retrieval) or mixed (half best-ranked, half random).")
flags.DEFINE_float("eval_users_fraction", _R.eval_users_fraction,
                   "ranking, --holdout=last data: share of users held out for evaluation.")


def config_from_flags() -> pipeline.PreprocessConfig:
  delimiter = {"\\t": "\t", "tab": "\t"}.get(FLAGS.delimiter, FLAGS.delimiter)
  csv = None
  if FLAGS.source in readers.COLUMN_SOURCES:
    columns = {name: getattr(FLAGS, name) for name in ("user_col", "item_col", "time_col")}
    if FLAGS.source == "recbole":  # RecBole's field names unless the flags say otherwise
      columns = {name: value or readers.RECBOLE_DEFAULTS[name] for name, value in columns.items()}
    csv = readers.CsvOptions(
        **columns, category_col=FLAGS.category_col, delimiter=delimiter,
        column_names=tuple(FLAGS.column_names), time_unit=FLAGS.time_unit,
        time_format=FLAGS.time_format)
  return pipeline.PreprocessConfig(
      source=FLAGS.source, input=FLAGS.input or "", output_dir=FLAGS.output_dir or "",
      overwrite=FLAGS.overwrite, max_seq_len=FLAGS.max_seq_len, samples=FLAGS.samples,
      max_samples_per_user=FLAGS.max_samples_per_user, holdout=FLAGS.holdout,
      min_user_clicks=FLAGS.min_user_clicks, min_item_clicks=FLAGS.min_item_clicks,
      num_shards=FLAGS.num_shards, compression=FLAGS.compression, seed=FLAGS.seed,
      num_workers=FLAGS.num_workers, movies=FLAGS.movies, csv=csv)


def ranking_config_from_flags() -> ranking.RankingConfig:
  return ranking.RankingConfig(
      data_dir=FLAGS.data_dir or "", candidates=tuple(FLAGS.candidates),
      output_dir=FLAGS.output_dir or "", item_embeddings=FLAGS.item_embeddings,
      max_hist_len=FLAGS.max_hist_len, negatives_per_user=FLAGS.negatives_per_user,
      negative_sampling=FLAGS.negative_sampling,
      eval_users_fraction=FLAGS.eval_users_fraction, num_shards=FLAGS.num_shards,
      compression=FLAGS.compression, seed=FLAGS.seed, overwrite=FLAGS.overwrite)


def main_ranking() -> None:
  try:
    config = ranking_config_from_flags()
    config.validate()
    manifest = ranking.run(config)
  except ConfigError as e:
    cli.fail("preprocess", str(e), 2)
  except DataError as e:
    cli.fail("preprocess", str(e), 1)
  c = manifest.counts
  print(f"preprocess: wrote {manifest.data_dir}: train {c['examples_train']} examples "
        f"({c['positives_train']} positive, {c['users_train']} users), eval "
        f"{c['examples_eval']} examples ({c['positives_eval']} positive, {c['users_eval']} "
        f"users, {manifest.eval_split} click)")


def main(argv):
  if len(argv) > 1:
    cli.fail("preprocess", f"unexpected arguments {argv[1:]}", 1)
  if FLAGS.mode == "ranking":
    main_ranking()
    return
  for name in ("source", "input", "output_dir"):
    if not getattr(FLAGS, name):
      cli.fail("preprocess", f"--{name} is required", 2)
  config = config_from_flags()
  try:
    config.validate()
  except ValueError as e:
    cli.fail("preprocess", str(e), 2)
  try:
    if FLAGS.engine == "ray":
      from preprocess import ray_engine  # pylint: disable=import-outside-toplevel
      manifest = ray_engine.run(config, FLAGS.ray_address, FLAGS.ray_partitions,
                                FLAGS.ray_object_store_bytes)
    else:
      manifest = pipeline.run(config)
  except ConfigError as e:
    cli.fail("preprocess", str(e), 2)
  except DataError as e:
    cli.fail("preprocess", str(e), 1)
  counts = manifest.counts
  print(f"preprocess: wrote {manifest.data_dir}: {counts['users']} users, {counts['items']} "
        f"items, {counts['clicks']} clicks; " + ", ".join(
            f"{name} {split.num_examples} examples" for name, split in manifest.splits.items()))


def run():
  logging.set_verbosity(logging.INFO)
  app.run(main)


if __name__ == "__main__":
  run()
