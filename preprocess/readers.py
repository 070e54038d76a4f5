"""Readers: each `--source` format -> one `RawLog` of integer ids and times.

Every reader parses with pyarrow (vectorised, multi-threaded; `.gz` and other
compressions are detected from the file name), never line by line. An id
column whose every value is a canonical int64 is read as integers, any other
as string ids (`RawLog`); an empty id is refused with a `DataError` naming
the file, the column and the line (or Parquet row).

Array position i in a `RawLog` is data row i of the source in file order;
the pipeline uses it to break timestamp ties, so equal times keep file order.
"""

import dataclasses
import gzip
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq
import pyarrow.types as patypes
from absl import logging

from contracts.errors import DataError
from contracts.fileio import os_error_reason

SOURCES = ("news", "movielens", "sasrec_txt", "csv", "sequences", "recbole", "jsonl")
# Sources whose columns are named by CsvOptions (--user_col, --item_col, ...).
COLUMN_SOURCES = ("csv", "recbole", "jsonl")
# RecBole's default field names (its USER_ID_FIELD, ITEM_ID_FIELD, TIME_FIELD).
RECBOLE_DEFAULTS = {"user_col": "user_id", "item_col": "item_id", "time_col": "timestamp"}
TIME_UNITS = ("ms", "s", "order")

NEWS_CLICKS = "train_click_log.csv"
NEWS_ARTICLES = "articles.csv"
NEWS_CLICK_COLUMNS = ("user_id", "click_article_id", "click_timestamp")
NEWS_ARTICLE_COLUMNS = ("article_id", "category_id", "created_at_ts", "words_count")


@dataclasses.dataclass
class RawLog:
  """A click log in source row order, plus optional item features.

  Ids are int64: the raw ids themselves, or for an id kind in `dictionaries`
  (string ids) the position of the raw id in that kind's sorted dictionary,
  so sorting and grouping work on integers and keep the raw ids' order.
  """
  user_id: np.ndarray  # int64
  item_id: np.ndarray  # int64
  ts: np.ndarray  # int64, in `time_unit`
  time_unit: str  # "ms", "s" or "order" (row order is the only clock)
  inputs: list[str]
  clicks_file: str  # for error messages
  # item_id (int64), category_id, created_at_ts, words_count (nullable Int64).
  items: pd.DataFrame | None = None
  # category_id (int64) -> name, for sources with named categories.
  category_names: pd.DataFrame | None = None
  # "user" / "item" / "category" -> sorted raw string ids (object array), for
  # the kinds whose ids are strings.
  dictionaries: dict[str, np.ndarray | None] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    # Readers pass every kind's _encode_ids result; None (integer ids) has no dictionary.
    self.dictionaries = {k: v for k, v in self.dictionaries.items() if v is not None}

  def id_types(self) -> dict[str, str]:
    kinds = ("user", "item") + (("category",) if self.items is not None and
                                "category_id" in self.items else ())
    return {kind: "string" if kind in self.dictionaries else "int64" for kind in kinds}


# An id that is a canonical int64: no sign but '-', no leading zero, 19 digits at most.
_CANONICAL_INT = r"^(0|-?[1-9][0-9]{0,18})$"


def _encode_ids(cols: list[pa.ChunkedArray], path: Path, name: str, header_lines: int,
                parquet: bool, others: tuple[tuple[Path, str, int], ...] = ()
                ) -> tuple[list[np.ndarray], np.ndarray | None]:
  """Id columns that share one vocabulary -> (int64 per column, sorted string
  dictionary or None). Integers stay integers; a text column is integers only
  when every value is a canonical integer (`030` beside `30` are two ids),
  else every value is a string id. Vectorised: one hash encoding, then work
  on the distinct values only. `others` names (file, column, header lines) of
  cols[1:] for messages (default: the same as the first)."""
  places = [(path, name, header_lines)] + list(others or [(path, name, header_lines)] *
                                               (len(cols) - 1))

  def place(flat_row: int) -> str:
    for col, (where, column, header) in zip(cols, places):
      if flat_row < len(col):
        return f"{where}: column {column!r} {_describe_row(flat_row, header, parquet)}"
      flat_row -= len(col)
    raise AssertionError(flat_row)

  offset = 0
  for col in cols:
    row = _first_null(col)
    if row is not None:
      raise DataError(f"{place(offset + row)}: empty value")
    offset += len(col)
  types = {col.type for col in cols}
  if all(patypes.is_integer(t) for t in types):
    out = []
    for col in cols:
      if patypes.is_unsigned_integer(col.type) and len(col) and \
          pc.max(col).as_py() >= 2**63:
        row = int(np.flatnonzero(col.to_numpy() >= np.uint64(2**63))[0])
        raise DataError(f"{place(sum(len(c) for c in cols[:len(out)]) + row)}: id "
                        f"{col[row].as_py()} does not fit int64; write the ids as strings")
      out.append(col.to_numpy().astype(np.int64, copy=False))
    return out, None
  if not all(patypes.is_string(t) or patypes.is_large_string(t) for t in types):
    raise DataError(f"{path}: column {name!r}: ids must be integers or strings, not "
                    f"{', '.join(sorted(map(str, types)))}")
  joined = pa.chunked_array([chunk.cast(pa.string()) for col in cols for chunk in col.chunks],
                            type=pa.string())
  encoded = joined.combine_chunks().dictionary_encode() if len(joined) else \
      pa.array([], pa.string()).dictionary_encode()
  dictionary, codes = encoded.dictionary, encoded.indices.to_numpy(zero_copy_only=False)
  empty = pc.equal(pc.utf8_length(dictionary), 0).to_numpy(zero_copy_only=False)
  if empty.any():
    raise DataError(f"{place(int(np.flatnonzero(codes == np.flatnonzero(empty)[0])[0]))}: "
                    "empty id")
  canonical = pc.match_substring_regex(dictionary, _CANONICAL_INT).to_numpy(zero_copy_only=False)
  values = None
  if canonical.all():
    try:
      values = pc.cast(dictionary, pa.int64()).to_numpy()
    except pa.ArrowInvalid:  # 19 digits beyond int64: strings, exact
      pass
  if values is not None:
    flat, dictionary_out = values[codes], None
  else:
    order = pc.sort_indices(dictionary).to_numpy()
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    flat = rank[codes]
    dictionary_out = dictionary.take(pa.array(order)).to_numpy(zero_copy_only=False)
    integers = int(canonical.sum())
    logging.info("%s: column %r holds string ids (%d distinct%s)", path, name, len(order),
                 f"; {integers} of them look like integers and are read as strings too"
                 if integers else "")
  out, start = [], 0
  for col in cols:
    out.append(flat[start:start + len(col)])
    start += len(col)
  return out, dictionary_out


@dataclasses.dataclass(frozen=True)
class CsvOptions:
  """How `--source=csv` finds its columns."""
  user_col: str
  item_col: str
  time_col: str = ""  # empty: row order gives time
  category_col: str = ""  # optional: an item's category (its most frequent value)
  delimiter: str = ","
  column_names: tuple[str, ...] = ()  # for files without a header line
  time_unit: str = "s"
  time_format: str = ""  # strftime format of date strings; "": one format inferred per column


def _first_null(col: pa.ChunkedArray) -> int | None:
  """Row of the first null of a column, or None."""
  if not col.null_count:
    return None
  return int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])


def _refuse_nulls(col: pa.ChunkedArray, path: Path, name: str, header_lines: int,
                  parquet: bool) -> None:
  row = _first_null(col)
  if row is not None:
    raise DataError(f"{path}: column {name!r} {_describe_row(row, header_lines, parquet)}: "
                    "empty value")


def _describe_row(row: int, header_lines: int, parquet: bool) -> str:
  if parquet:
    return f"row {row + 1}"
  return f"line {row + 1 + header_lines}"


def _column_to_int64(col: pa.ChunkedArray, path: Path, name: str, header_lines: int,
                     parquet: bool = False) -> np.ndarray:
  """A pyarrow column -> int64 numpy, or a DataError naming the first bad row."""
  _refuse_nulls(col, path, name, header_lines, parquet)
  if patypes.is_integer(col.type):
    return col.to_numpy().astype(np.int64, copy=False)
  if patypes.is_string(col.type):
    empty = pc.equal(col, "").to_numpy(zero_copy_only=False)
    if empty.any():
      row = int(np.flatnonzero(empty)[0])
      raise DataError(f"{path}: column {name!r} {_describe_row(row, header_lines, parquet)}: "
                      "empty value")
  try:  # exact: strings are parsed, floats must be integral
    return pc.cast(col, pa.int64()).to_numpy()
  except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
    # Error path only: locate the first offending row for the message.
    values = pd.Series(col.to_numpy(zero_copy_only=False))
    numeric = pd.to_numeric(values.astype(str), errors="coerce").to_numpy(np.float64)
    bad = ~np.isfinite(numeric) | (numeric != np.round(numeric)) | (np.abs(numeric) >= 2.0**63)
    if not bad.any():
      raise DataError(f"{path}: column {name!r}: not integer ids ({e})") from e
    row = int(np.flatnonzero(bad)[0])
    raise DataError(f"{path}: column {name!r} {_describe_row(row, header_lines, parquet)}: "
                    f"{str(values.iloc[row])!r} is not an integer") from e


def _require_file(path: Path, what: str) -> Path:
  if path.is_file():
    return path
  gz = path.with_name(path.name + ".gz")
  if gz.is_file():
    return gz
  raise DataError(f"{path}: {what} not found")


def _require_input_file(path: Path, source: str) -> None:
  """A DataError unless `path` is a file: what it is instead, and for a
  directory of CSV/Parquet files, the engine that reads one."""
  if path.is_file():
    return
  if path.is_dir():
    also = " (--engine=ray reads every CSV or Parquet file of a directory)" \
        if source == "csv" else ""
    raise DataError(f"{path}: a directory; --source={source} reads one file{also}")
  raise DataError(f"{path}: file not found")


def check_columns(path: Path | str, available: list[str], columns: tuple[str, ...] | list[str]
                  ) -> None:
  """The columns the job reads are in the file's header, once each."""
  missing = [c for c in columns if c not in available]
  if missing:
    raise DataError(f"{path}: missing column(s) {missing}; the file has {available}")
  repeated = [c for c in columns if available.count(c) > 1]
  if repeated:
    raise DataError(f"{path}: column {repeated[0]!r} appears {available.count(repeated[0])} "
                    f"times in the header ({', '.join(available)}); which one holds the data "
                    "cannot be told")


def _read_csv(path: Path, columns: tuple[str, ...], delimiter: str = ",",
              column_names: tuple[str, ...] = (), text_columns: tuple[str, ...] = (),
              skip_rows: int = 0) -> tuple[pa.Table, int]:
  """Reads `columns` of a delimited file; returns the table and header line count.
  `text_columns` are read as text, whatever they look like (ids: `030` must
  not become 30)."""
  read_options = pacsv.ReadOptions(column_names=list(column_names) or None,
                                   block_size=1 << 22, skip_rows=skip_rows)
  parse_options = pacsv.ParseOptions(delimiter=delimiter)
  try:
    with pacsv.open_csv(path, read_options=read_options, parse_options=parse_options) as reader:
      available = reader.schema.names
  except pa.ArrowInvalid as e:
    if "Empty CSV file" in str(e):
      raise DataError(f"{path}: file is empty") from e
    raise DataError(f"{path}: cannot parse ({e})") from e
  check_columns(path, available, columns)
  try:
    # Streaming keeps a few blocks in memory instead of the whole parsed file.
    with pacsv.open_csv(path, read_options=read_options, parse_options=parse_options,
                        convert_options=pacsv.ConvertOptions(
                            include_columns=list(columns),
                            column_types={c: pa.string() for c in text_columns})
                        ) as reader:
      table = pa.Table.from_batches(list(reader), schema=reader.schema)
  except pa.ArrowInvalid:
    # Types are inferred from the first block; a later value that does not
    # fit lands here. Re-read as text so the caller can name the line.
    try:
      table = pacsv.read_csv(path, read_options=read_options, parse_options=parse_options,
                             convert_options=pacsv.ConvertOptions(
                                 include_columns=list(columns),
                                 column_types={c: pa.string() for c in columns}))
    except pa.ArrowInvalid as e:
      raise DataError(f"{path}: cannot parse ({e})") from e
  return table, skip_rows if column_names else 1


def _read_parquet(path: Path, columns: tuple[str, ...]) -> pa.Table:
  try:
    available = pq.read_schema(path).names
  except (OSError, pa.ArrowInvalid) as e:
    raise DataError(f"{path}: cannot read Parquet ({e})") from e
  check_columns(path, available, columns)
  return pq.read_table(path, columns=list(columns))


def read_news(input_dir: Path) -> RawLog:
  """The notebooks' data: train_click_log.csv + articles.csv (times in ms)."""
  input_dir = Path(input_dir)
  if not input_dir.is_dir():
    raise DataError(f"{input_dir}: --source=news needs a directory holding "
                    f"{NEWS_CLICKS} and {NEWS_ARTICLES}")
  clicks_path = _require_file(input_dir / NEWS_CLICKS, "click log")
  articles_path = _require_file(input_dir / NEWS_ARTICLES, "articles file")
  clicks, header = _read_csv(clicks_path, NEWS_CLICK_COLUMNS,
                             text_columns=("user_id", "click_article_id"))
  articles, a_header = _read_csv(articles_path, NEWS_ARTICLE_COLUMNS,
                                 text_columns=("article_id", "category_id"))
  dictionaries = {}
  (user,), dictionaries["user"] = _encode_ids([clicks.column("user_id")], clicks_path,
                                              "user_id", header, False)
  # One item vocabulary for the clicks and the articles table.
  (item, article), dictionaries["item"] = _encode_ids(
      [clicks.column("click_article_id"), articles.column("article_id")], clicks_path,
      "click_article_id", header, False, others=((articles_path, "article_id", a_header),))
  (category,), dictionaries["category"] = _encode_ids(
      [articles.column("category_id")], articles_path, "category_id", a_header, False)
  ts = _column_to_int64(clicks.column("click_timestamp"), clicks_path, "click_timestamp", header)
  _refuse_mixed_epoch_units(ts, clicks_path, "click_timestamp", header, False)
  items = pd.DataFrame({"item_id": article, "category_id": category})
  for c in ("created_at_ts", "words_count"):
    items[c] = _column_to_int64(articles.column(c), articles_path, c, a_header)
  return RawLog(user, item, ts, "ms", [str(clicks_path), str(articles_path)], str(clicks_path),
                items=_check_unique_items(items, articles_path, a_header,
                                          dictionaries.get("item")),
                dictionaries=dictionaries)


def _check_unique_items(items: pd.DataFrame, path: Path, header_lines: int,
                        dictionary: np.ndarray | None = None) -> pd.DataFrame:
  dup = items["item_id"].duplicated().to_numpy()
  if dup.any():
    row = int(np.flatnonzero(dup)[0])
    code = items["item_id"].iloc[row]
    raise DataError(f"{path}: line {row + 1 + header_lines}: item id "
                    f"{code if dictionary is None else dictionary[code]} appears more than once")
  for c in ("category_id", "created_at_ts", "words_count"):
    if c in items:
      items[c] = items[c].astype("Int64")
  return items


def read_movielens(path: Path, movies_path: Path | None = None) -> RawLog:
  """`UserID::MovieID::Rating::Timestamp` (seconds); every rating is a click.

  Categories come from movies.dat (`MovieID::Title::Genres`, latin-1) when
  given or found next to the ratings: the first listed genre.
  """
  path = Path(path)
  if path.is_dir():
    path = _require_file(path / "ratings.dat", "MovieLens ratings file")
  elif not path.is_file():
    raise DataError(f"{path}: MovieLens ratings file not found")
  # '::' is two one-character delimiters around empty fields: 7 columns.
  names = tuple(f"f{i}" for i in range(7))
  table, _ = _read_csv(path, ("f0", "f2", "f6"), delimiter=":", column_names=names,
                       text_columns=("f0", "f2"))
  ts = _column_to_int64(table.column("f6"), path, "Timestamp", 0)
  inputs = [str(path)]
  if movies_path is None:
    for candidate in (path.with_name("movies.dat"), path.with_name("movies.dat.gz")):
      if candidate.is_file():
        movies_path = candidate
        break
  dictionaries = {}
  (user,), dictionaries["user"] = _encode_ids([table.column("f0")], path, "UserID", 0, False)
  items = category_names = None
  if movies_path is None:
    (item,), dictionaries["item"] = _encode_ids([table.column("f2")], path, "MovieID", 0, False)
  else:
    movie_id, first_genre = _read_movies(Path(movies_path))
    # One item vocabulary for the ratings and movies.dat.
    (item, movie), dictionaries["item"] = _encode_ids(
        [table.column("f2"), pa.chunked_array([pa.array(movie_id, pa.string())])], path,
        "MovieID", 0, False, others=((Path(movies_path), "MovieID", 0),))
    names = np.array(sorted(set(first_genre) - {""}))
    genre_id = pd.Series(np.arange(1, len(names) + 1), index=names)
    items = pd.DataFrame({"item_id": movie,
                          "category_id": first_genre.map(genre_id).astype("Int64").to_numpy()})
    items = _check_unique_items(items, Path(movies_path), 0, dictionaries["item"])
    category_names = pd.DataFrame({"category_id": genre_id.to_numpy(np.int64), "name": names})
    inputs.append(str(movies_path))
  return RawLog(user, item, ts, "s", inputs, str(path), items=items,
                category_names=category_names,
                dictionaries=dictionaries)


def _read_movies(path: Path) -> tuple[np.ndarray, pd.Series]:
  """movies.dat's MovieID (text) and first listed genre of every line."""
  if not path.is_file():
    raise DataError(f"{path}: movies file not found")
  # Titles may hold ':' so split on '::' with pandas string ops (3.9k rows).
  lines = pd.read_csv(path, sep="\t", header=None, names=["line"], encoding="latin-1",
                      compression="infer", dtype=str, quoting=3)["line"]
  movie_id = lines.str.partition("::")[0]
  genres = lines.str.rpartition("::")[2]
  return movie_id.to_numpy(dtype=object), genres.str.split("|").str[0].fillna("")


def _read_lines(path: Path) -> pa.Array:
  """Every line of a text file as a string (empty lines kept, so row r is line r + 1)."""
  read_options = pacsv.ReadOptions(column_names=["line"], block_size=1 << 22)
  # A delimiter and no quoting that never split a line: each line is one field.
  parse_options = pacsv.ParseOptions(delimiter="\x1f", quote_char=False, escape_char=False,
                                     ignore_empty_lines=False)
  try:
    table = pacsv.read_csv(path, read_options=read_options, parse_options=parse_options,
                           convert_options=pacsv.ConvertOptions(column_types={"line": pa.string()}))
  except pa.ArrowInvalid as e:
    if "Empty CSV file" in str(e):
      raise DataError(f"{path}: file is empty") from e
    raise DataError(f"{path}: cannot parse ({e})") from e
  return pc.fill_null(table.column("line").combine_chunks(), "")


def read_sequences(path: Path) -> RawLog:
  """One user per line, `user item1 item2 ...` in time order (the S3-Rec,
  ICLRec and DuoRec releases); whitespace separated, order is the clock."""
  path = Path(path)
  _require_input_file(path, "sequences")
  lines = pc.utf8_trim_whitespace(_read_lines(path))
  tokens = pc.utf8_split_whitespace(lines)
  count = pc.list_value_length(tokens).to_numpy(zero_copy_only=False).copy()
  count[pc.equal(lines, "").to_numpy(zero_copy_only=False)] = 0  # a blank line
  lonely = np.flatnonzero(count == 1)
  if len(lonely):
    raise DataError(f"{path}: line {lonely[0] + 1}: a user ({tokens[int(lonely[0])][0]}) and no "
                    "items")
  tokens = tokens.filter(pa.array(count > 1))  # blank lines carry nothing
  users = pc.list_element(tokens, 0)
  item_lists = pc.list_slice(tokens, 1)
  items = pc.list_flatten(item_lists)
  owner = pc.list_parent_indices(item_lists).to_numpy()
  line_of_user = np.flatnonzero(count > 1)
  dictionaries = {}
  (user,), dictionaries["user"] = _encode_ids([pa.chunked_array([users])], path, "user", 0,
                                              False)
  (item,), dictionaries["item"] = _encode_ids([pa.chunked_array([items])], path, "item", 0,
                                              False)
  if len(np.unique(user)) != len(user):
    first, again = _first_repeat(user)
    raise DataError(f"{path}: line {line_of_user[again] + 1}: user {users[again]} already had "
                    f"line {line_of_user[first] + 1} (one line per user)")
  return RawLog(user[owner], item, np.arange(len(item), dtype=np.int64), "order", [str(path)],
                str(path), dictionaries=dictionaries)


def _first_repeat(values: np.ndarray) -> tuple[int, int]:
  """Positions (first, second) of the earliest value seen twice."""
  order = np.argsort(values, kind="stable")
  same = np.flatnonzero(values[order][1:] == values[order][:-1])
  seconds = order[same + 1]
  k = int(np.argmin(seconds))
  return int(order[same[k]]), int(seconds[k])


def read_recbole(path: Path, options: CsvOptions) -> RawLog:
  """A RecBole atomic `.inter` file: tab separated, a `name:type` header
  (`user_id:token`, `timestamp:float`, ...). Token fields are ids (integers or
  strings), float times are seconds."""
  path = Path(path)
  _require_input_file(path, "recbole")
  header = _read_lines_head(path)
  fields = header.split("\t")
  untyped = [f for f in fields if ":" not in f]
  if untyped:
    raise DataError(f"{path}: line 1: header field {untyped[0]!r} has no type (RecBole "
                    "headers are name:type, e.g. user_id:token)")
  names = tuple(f.split(":", 1)[0] for f in fields)
  wanted = {c for c in (options.user_col, options.item_col, options.time_col,
                        options.category_col) if c}
  missing = sorted(wanted - set(names))
  if missing:
    raise DataError(f"{path}: no field(s) {missing} in the header ({', '.join(fields)})")
  renamed = dataclasses.replace(options, delimiter="\t", column_names=names)
  return _read_columns(path, renamed, skip_header=True)


def _read_lines_head(path: Path) -> str:
  with pa.input_stream(str(path), compression="detect") as stream:
    first = stream.read(1 << 16).decode("utf-8", errors="replace")
  return first.split("\n", 1)[0].rstrip("\r")


def read_jsonl(path: Path, options: CsvOptions) -> RawLog:
  """JSON lines with the fields --user_col, --item_col, --time_col (e.g. the
  Amazon review dumps: reviewerID, asin, unixReviewTime)."""
  path = Path(path)
  _require_input_file(path, "jsonl")
  wanted = [c for c in (options.user_col, options.item_col, options.time_col,
                        options.category_col) if c]
  try:
    table = pajson.read_json(path, read_options=pajson.ReadOptions(block_size=1 << 22))
  except pa.ArrowInvalid as e:
    raise DataError(f"{path}: {_json_error(path, e)}") from None
  missing = [c for c in wanted if c not in table.column_names]
  if missing:
    raise DataError(f"{path}: no field(s) {missing} in the JSON objects (they have "
                    f"{table.column_names[:20]})")
  table = table.select(wanted)
  for name in (options.user_col, options.item_col, options.category_col):
    if name and patypes.is_floating(table.column(name).type):
      raise DataError(f"{path}: field {name!r}: ids are numbers with a fraction; ids must be "
                      "integers or strings")
  return _log_from_table(table, path, options, header=0, parquet=False)  # row r: line r + 1


def _json_error(path: Path, error: Exception) -> str:
  """Which line does not parse: pyarrow names a row within a block only, so
  the lines are checked one by one on this (error) path."""
  import json as json_lib
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "rt", encoding="utf-8", errors="strict") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        value = json_lib.loads(line)
      except ValueError as e:
        return f"line {number}: not JSON ({e.args[0] if e.args else e})"
      if not isinstance(value, dict):
        return f"line {number}: not a JSON object"
  return f"cannot parse ({error})"


def read_sasrec_txt(path: Path) -> RawLog:
  """`user item` per line, chronological within each user; order is the clock."""
  path = Path(path)
  _require_input_file(path, "sasrec_txt")
  table, _ = _read_csv(path, ("user", "item"), delimiter=" ", column_names=("user", "item"),
                       text_columns=("user", "item"))
  dictionaries = {}
  (user,), dictionaries["user"] = _encode_ids([table.column("user")], path, "user", 0, False)
  (item,), dictionaries["item"] = _encode_ids([table.column("item")], path, "item", 0, False)
  return RawLog(user, item, np.arange(len(user), dtype=np.int64), "order", [str(path)],
                str(path), dictionaries=dictionaries)


_DAY_MONTH = r"^(\d{1,2})([/.\-])(\d{1,2})[/.\-](\d{2}|\d{4})(\D.*)?$"
_ISO_DATE = r"^\d{4}-\d{2}-\d{2}"


def _parse_dates(values: pd.Series, path: Path, name: str, header_lines: int, parquet: bool,
                 time_format: str) -> pd.Series:
  """Date strings -> UTC timestamps with one format for the whole column:
  --time_format, else ISO 8601, else day/month or month/day decided from the
  whole column (refused when it cannot be told), else the format pandas
  infers from the first value. Works on the distinct values."""
  def where(row: int) -> str:
    return f"{_describe_row(row, header_lines, parquet)}: {values.iloc[row]!r}"

  codes, uniques = pd.factorize(values)
  text = pd.Series(uniques, dtype=object).astype(str)
  first_row = pd.Series(np.arange(len(values))).groupby(codes).first().to_numpy()
  kwargs: dict = {"format": time_format} if time_format else {}
  if not time_format:
    iso = text.str.match(_ISO_DATE)
    parts = text.str.extract(_DAY_MONTH)
    if iso.all():
      kwargs = {"format": "ISO8601"}
    elif parts[0].notna().all():
      a, b = parts[0].astype(int).to_numpy(), parts[2].astype(int).to_numpy()
      day_first, month_first = np.flatnonzero(a > 12), np.flatnonzero(b > 12)
      if len(day_first) and len(month_first):
        raise DataError(f"{path}: column {name!r} has dates with the day first "
                        f"({where(first_row[day_first[0]])}) and with the month first "
                        f"({where(first_row[month_first[0]])}): one date format per column")
      if not len(day_first) and not len(month_first) and (a != b).any():
        row = first_row[int(np.flatnonzero(a != b)[0])]
        raise DataError(f"{path}: column {name!r}: whether {where(row)} is day/month or "
                        "month/day cannot be told from the column (no value above 12); pass "
                        "--time_format, e.g. --time_format=%d/%m/%Y")
      kwargs = {"dayfirst": bool(len(day_first))}
    elif parts[0].notna().any() or iso.any():
      day_month = parts[0].notna().to_numpy()
      iso = iso.to_numpy()
      # The first date (factorize keeps file order) sets the column's format;
      # the first value not in it is the odd one, a date of the other kind
      # included (no value is both ISO and day/month).
      kind = int(np.flatnonzero(day_month | iso)[0])
      odd = int(np.flatnonzero(~(iso if iso[kind] else day_month))[0])
      raise DataError(f"{path}: column {name!r}: {where(first_row[odd])} is not in the format "
                      f"of {where(first_row[kind])}: one date format per column (or pass "
                      "--time_format)")
  try:
    parsed = pd.to_datetime(pd.Series(uniques), errors="coerce", utc=True, **kwargs)
  except (ValueError, TypeError) as e:
    raise DataError(f"{path}: column {name!r}: --time_format={time_format!r}: {e}") from None
  bad = parsed.isna().to_numpy()
  if bad.any():
    how = f"--time_format={time_format}" if time_format else "the column's date format"
    raise DataError(f"{path}: column {name!r} {where(first_row[int(np.flatnonzero(bad)[0])])}"
                    f" is not a date in {how}")
  return pd.Series(parsed.to_numpy()[codes])


def _time_column_to_int64(col: pa.ChunkedArray, path: Path, name: str, header_lines: int,
                          time_unit: str, parquet: bool, time_format: str = "") -> np.ndarray:
  """Integer times pass through; timestamps and date strings -> epoch `time_unit`."""
  _refuse_nulls(col, path, name, header_lines, parquet)
  if patypes.is_timestamp(col.type) or patypes.is_date(col.type) or patypes.is_string(col.type):
    values = pd.Series(col.to_numpy(zero_copy_only=False))
    if patypes.is_string(col.type):
      numeric = pd.to_numeric(values, errors="coerce").notna().to_numpy()
      if numeric.all():
        return _column_to_int64(col, path, name, header_lines, parquet)
      if numeric.any():
        i, d = int(np.flatnonzero(numeric)[0]), int(np.flatnonzero(~numeric)[0])
        raise DataError(
            f"{path}: column {name!r} mixes integer times ({_describe_row(i, header_lines, parquet)}"
            f": {values.iloc[i]!r}) and dates ({_describe_row(d, header_lines, parquet)}: "
            f"{values.iloc[d]!r}): one kind per column")
      parsed = _parse_dates(values, path, name, header_lines, parquet, time_format)
    else:
      parsed = pd.to_datetime(values, utc=True)
    since_epoch = parsed - pd.Timestamp("1970-01-01", tz="UTC")
    ns = since_epoch.to_numpy(dtype="timedelta64[ns]").astype(np.int64)
    return ns // (1_000_000 if time_unit == "ms" else 1_000_000_000)
  if patypes.is_floating(col.type):  # RecBole's timestamp:float; fractions of the unit drop
    return np.floor(col.to_numpy()).astype(np.int64)
  return _column_to_int64(col, path, name, header_lines, parquet)


# An epoch time in one of these units is a date of 1973-03 to 2286-11 when it
# lies in [10^8, 10^10) times 1000^k (k: the unit's index); read in another
# unit it is before 1973 or after 5000. Two of these bands in one integer
# column are two units (ms written beside s scramble the order); a value in
# no band (a counter 1..100, a date before 1973) says nothing about the unit.
EPOCH_UNITS = ("seconds", "milliseconds", "microseconds", "nanoseconds")


def epoch_unit_of(ts: np.ndarray) -> np.ndarray:
  """Per time, the index in EPOCH_UNITS of the unit in which it is a plausible
  date, or -1 (int8)."""
  unit = np.full(len(ts), -1, np.int8)
  for k in range(len(EPOCH_UNITS)):
    low, high = 10**8 * 1000**k, 10**10 * 1000**k
    inside = ts >= low
    if high <= np.iinfo(np.int64).max:
      inside &= ts < high
    unit[inside] = k
  return unit


def mixed_epoch_units(name: str, first: tuple[str, str, int, int],
                      second: tuple[str, str, int, int]) -> DataError:
  """The error for a time column holding two epoch units; each example is
  (file, row description, value, EPOCH_UNITS index)."""
  (path_a, row_a, value_a, unit_a), (path_b, row_b, value_b, unit_b) = first, second
  where_b = row_b if path_b == path_a else f"{path_b} {row_b}"
  return DataError(
      f"{path_a}: column {name!r} mixes epoch {EPOCH_UNITS[unit_a]} ({row_a}: {value_a}) and "
      f"epoch {EPOCH_UNITS[unit_b]} ({where_b}: {value_b}), {1000 ** (unit_b - unit_a)}x "
      "apart: write the column in one unit (or pass --time_unit=order if it counts events "
      "rather than telling time)")


def _refuse_mixed_epoch_units(ts: np.ndarray, path: Path, name: str, header_lines: int,
                              parquet: bool) -> None:
  """A DataError naming the first row of the two smallest epoch units, when
  the column holds more than one."""
  unit = epoch_unit_of(ts)
  present = np.flatnonzero(np.bincount(unit + 1, minlength=len(EPOCH_UNITS) + 1)[1:])
  if len(present) < 2:
    return
  examples = []
  for k in present[:2]:
    row = int(np.flatnonzero(unit == k)[0])
    examples.append((str(path), _describe_row(row, header_lines, parquet), int(ts[row]), int(k)))
  raise mixed_epoch_units(name, *examples)


def read_csv_source(path: Path, options: CsvOptions) -> RawLog:
  """Any CSV (any delimiter, optional header) or Parquet file with named columns."""
  path = Path(path)
  _require_input_file(path, "csv")
  return _read_columns(path, options)


def _read_columns(path: Path, options: CsvOptions, skip_header: bool = False) -> RawLog:
  columns = tuple(c for c in (options.user_col, options.item_col, options.time_col,
                              options.category_col) if c)
  parquet = path.suffix in (".parquet", ".pq")
  id_columns = tuple(c for c in (options.user_col, options.item_col, options.category_col) if c)
  if parquet:
    table, header = _read_parquet(path, columns), 0
  else:
    table, header = _read_csv(path, columns, options.delimiter, options.column_names,
                              text_columns=id_columns, skip_rows=int(skip_header))
  return _log_from_table(table, path, options, header, parquet)


def _log_from_table(table: pa.Table, path: Path, options: CsvOptions, header: int,
                    parquet: bool) -> RawLog:
  """The named columns of a table -> RawLog (ids encoded, times parsed)."""
  dictionaries = {}
  (user,), dictionaries["user"] = _encode_ids([table.column(options.user_col)], path,
                                              options.user_col, header, parquet)
  (item,), dictionaries["item"] = _encode_ids([table.column(options.item_col)], path,
                                              options.item_col, header, parquet)
  if options.time_col:
    ts = _time_column_to_int64(table.column(options.time_col), path, options.time_col, header,
                               options.time_unit, parquet, options.time_format)
    time_unit = options.time_unit
    if time_unit != "order":
      _refuse_mixed_epoch_units(ts, path, options.time_col, header, parquet)
  else:
    ts, time_unit = np.arange(len(user), dtype=np.int64), "order"
  items = None
  if options.category_col:
    (category,), dictionaries["category"] = _encode_ids(
        [table.column(options.category_col)], path, options.category_col, header, parquet)
    # An item's category is its most frequent value in the log (ties: smallest id).
    pairs = pd.DataFrame({"item_id": item, "category_id": category})
    counts = pairs.value_counts().reset_index(name="n")
    counts = counts.sort_values(["item_id", "n", "category_id"], ascending=[True, False, True])
    items = counts.drop_duplicates("item_id")[["item_id", "category_id"]].reset_index(drop=True)
    items["category_id"] = items["category_id"].astype("Int64")
  return RawLog(user, item, ts, time_unit, [str(path)], str(path), items=items,
                dictionaries=dictionaries)


def read_source(source: str, input_path: Path | str, csv_options: CsvOptions | None = None,
                movies_path: Path | str | None = None) -> RawLog:
  """Dispatches on `--source`. A file that cannot be read (cut short, a broken
  gzip stream, an I/O error) is a DataError naming it."""
  input_path = Path(input_path)
  try:
    return _read_source(source, input_path, csv_options, movies_path)
  except (OSError, EOFError, zlib.error) as e:
    where = getattr(e, "filename", None) or input_path
    reason = os_error_reason(e) if isinstance(e, OSError) else str(e)
    raise DataError(f"{where}: cannot read it ({reason}); is the file complete?") from None


def _read_source(source: str, input_path: Path, csv_options: CsvOptions | None,
                 movies_path: Path | str | None) -> RawLog:
  if source == "news":
    log = read_news(input_path)
  elif source == "movielens":
    log = read_movielens(input_path, Path(movies_path) if movies_path else None)
  elif source == "sasrec_txt":
    log = read_sasrec_txt(input_path)
  elif source == "sequences":
    log = read_sequences(input_path)
  elif source in COLUMN_SOURCES:
    if csv_options is None:
      raise ValueError(f"--source={source} needs CsvOptions")
    reader = {"csv": read_csv_source, "recbole": read_recbole, "jsonl": read_jsonl}[source]
    log = reader(input_path, csv_options)
  else:
    raise ValueError(f"unknown source {source!r}; choose from {SOURCES}")
  if len(log.user_id) == 0:
    raise DataError(f"{log.clicks_file}: the click log has no rows")
  return log
