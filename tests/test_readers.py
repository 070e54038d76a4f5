"""Every reader on small fixtures written here, and bad input."""

import gzip
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from contracts.errors import DataError
from preprocess import readers

CLICKS = ("user_id,click_article_id,click_timestamp,click_environment\n"
          "7,100,3000,4\n5,101,1000,4\n7,102,2000,4\n")
ARTICLES = ("article_id,category_id,created_at_ts,words_count\n"
            "100,1,10,200\n101,2,20,300\n102,1,30,400\n103,3,40,500\n")


def write(path, text, compress=False):
  if compress:
    with gzip.open(path, "wt") as f:
      f.write(text)
  else:
    path.write_text(text)
  return path


@pytest.mark.parametrize("compress", [False, True])
def test_news_reader(tmp_path, compress):
  suffix = ".gz" if compress else ""
  write(tmp_path / f"train_click_log.csv{suffix}", CLICKS, compress)
  write(tmp_path / f"articles.csv{suffix}", ARTICLES, compress)
  log = readers.read_source("news", tmp_path)
  assert log.user_id.tolist() == [7, 5, 7]  # file order kept
  assert log.item_id.tolist() == [100, 101, 102]
  assert log.ts.tolist() == [3000, 1000, 2000]
  assert log.time_unit == "ms"
  assert log.items["item_id"].tolist() == [100, 101, 102, 103]
  assert log.items["category_id"].tolist() == [1, 2, 1, 3]
  assert log.items["words_count"].tolist() == [200, 300, 400, 500]


def test_movielens_reader_with_movies_categories(tmp_path):
  with gzip.open(tmp_path / "ratings.dat.gz", "wt") as f:
    f.write("1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n")
  (tmp_path / "movies.dat").write_bytes(
      "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
      "661::James and the Giant Peach: The Movie (1996)::Animation|Children's\n"
      "5::Caf\xe9 Society::Comedy|Drama\n".encode("latin-1"))
  log = readers.read_source("movielens", tmp_path / "ratings.dat.gz")
  assert log.user_id.tolist() == [1, 1, 2]
  assert log.item_id.tolist() == [1193, 661, 1193]
  assert log.ts.tolist() == [978300760, 978302109, 978298413]
  assert log.time_unit == "s"
  # First genre, genres numbered alphabetically from 1: Animation, Comedy, Drama.
  assert dict(zip(log.items["item_id"], log.items["category_id"])) == {1193: 3, 661: 1, 5: 2}
  assert log.category_names["name"].tolist() == ["Animation", "Comedy", "Drama"]


def test_sasrec_txt_reader_uses_line_order_as_time(tmp_path):
  with gzip.open(tmp_path / "ml.txt.gz", "wt") as f:
    f.write("1 30\n1 10\n2 20\n")
  log = readers.read_source("sasrec_txt", tmp_path / "ml.txt.gz")
  assert log.user_id.tolist() == [1, 1, 2]
  assert log.item_id.tolist() == [30, 10, 20]
  assert log.ts.tolist() == [0, 1, 2]
  assert log.time_unit == "order"


def test_csv_reader_with_header_dates_and_categories(tmp_path):
  path = write(tmp_path / "log.csv",
               "u,i,when,cat\n1,10,2024-01-02,5\n1,11,2024-01-01,6\n2,10,2024-01-03,5\n"
               "3,10,2024-01-03,7\n")
  opts = readers.CsvOptions(user_col="u", item_col="i", time_col="when", category_col="cat")
  log = readers.read_source("csv", path, opts)
  assert log.user_id.tolist() == [1, 1, 2, 3]
  assert log.ts.tolist() == [1704153600, 1704067200, 1704240000, 1704240000]
  # Item 10's most frequent category is 5 (2 of 3 rows).
  assert dict(zip(log.items["item_id"], log.items["category_id"])) == {10: 5, 11: 6}


def test_csv_reader_headerless_tab_separated(tmp_path):
  path = write(tmp_path / "u.data", "196\t242\t3\t881250949\n186\t302\t3\t891717742\n")
  opts = readers.CsvOptions(user_col="user", item_col="item", time_col="ts", delimiter="\t",
                            column_names=("user", "item", "rating", "ts"))
  log = readers.read_source("csv", path, opts)
  assert log.user_id.tolist() == [196, 186]
  assert log.ts.tolist() == [881250949, 891717742]


def test_csv_reader_parquet_without_time_uses_row_order(tmp_path):
  pd.DataFrame({"user": [3, 3, 4], "item": [7, 8, 7]}).to_parquet(tmp_path / "log.parquet")
  log = readers.read_source("csv", tmp_path / "log.parquet",
                            readers.CsvOptions(user_col="user", item_col="item"))
  assert log.item_id.tolist() == [7, 8, 7]
  assert log.ts.tolist() == [0, 1, 2]
  assert log.time_unit == "order"


def test_missing_file_names_the_path(tmp_path):
  write(tmp_path / "articles.csv", ARTICLES)
  with pytest.raises(DataError, match=r"train_click_log\.csv: click log not found"):
    readers.read_source("news", tmp_path)


def test_missing_column_names_file_and_column(tmp_path):
  write(tmp_path / "train_click_log.csv", "user_id,article,click_timestamp\n1,2,3\n")
  write(tmp_path / "articles.csv", ARTICLES)
  with pytest.raises(DataError, match=r"train_click_log\.csv: missing column\(s\) "
                     r"\['click_article_id'\]"):
    readers.read_source("news", tmp_path)


@pytest.mark.parametrize("bad,line,what", [
    ("7,,3000", 3, "empty id"),
    ("7,101,", 3, "empty value"),
])
def test_an_empty_field_names_file_column_and_line(tmp_path, bad, line, what):
  write(tmp_path / "train_click_log.csv",
        "user_id,click_article_id,click_timestamp\n5,101,1000\n" + bad + "\n7,102,2\n")
  write(tmp_path / "articles.csv", ARTICLES)
  with pytest.raises(DataError) as e:
    readers.read_source("news", tmp_path)
  message = str(e.value)
  assert "train_click_log.csv" in message and f"line {line}" in message
  assert what in message


def test_news_string_ids_share_one_item_vocabulary_with_the_articles(tmp_path):
  write(tmp_path / "train_click_log.csv",
        "user_id,click_article_id,click_timestamp\nu5,N101,1000\nu5,N100,1001\n")
  write(tmp_path / "articles.csv", "article_id,category_id,created_at_ts,words_count\n"
        "N100,news,10,200\nN101,sport,20,300\nN102,news,30,400\n")
  log = readers.read_source("news", tmp_path)
  items = log.dictionaries["item"]
  assert list(items[log.item_id]) == ["N101", "N100"]
  assert list(items[log.items.item_id]) == ["N100", "N101", "N102"]
  assert list(log.dictionaries["category"][log.items.category_id]) == ["news", "sport", "news"]
  write(tmp_path / "articles.csv", "article_id,category_id,created_at_ts,words_count\n"
        "N100,news,10,200\nN100,sport,20,300\n")
  with pytest.raises(DataError, match=r"articles\.csv: line 3: item id N100 appears more"):
    readers.read_source("news", tmp_path)


def test_string_ids_are_kept_exact_and_sorted_dictionaries_give_the_codes(tmp_path):
  # "030" beside "30": two items; a column mixing integers and strings is strings.
  path = write(tmp_path / "x.txt", "u_b B00ABC\nu_b 030\nu_a 30\nu_a B00ABC\n")
  log = readers.read_source("sasrec_txt", path)
  assert list(log.dictionaries["user"]) == ["u_a", "u_b"]
  assert list(log.dictionaries["item"]) == ["030", "30", "B00ABC"]
  # Codes are positions in the sorted dictionary, row order kept.
  assert log.user_id.tolist() == [1, 1, 0, 0] and log.item_id.tolist() == [2, 0, 1, 2]
  assert log.id_types() == {"user": "string", "item": "string"}
  # Canonical integers stay integers, with no dictionary.
  ints = readers.read_source("sasrec_txt", write(tmp_path / "i.txt", "5 -3\n5 40\n"))
  assert ints.dictionaries == {} and ints.item_id.tolist() == [-3, 40]


def test_csv_string_ids_with_a_quoted_delimiter_and_string_categories(tmp_path):
  path = write(tmp_path / "log.csv", 'u,i,t,c\nN1,"a,b",1,x\nN1,B2,2,y\nN2,"a,b",3,x\n')
  log = readers.read_source("csv", path, readers.CsvOptions("u", "i", "t", category_col="c"))
  assert list(log.dictionaries["item"]) == ["B2", "a,b"]
  assert log.item_id.tolist() == [1, 0, 1]
  assert list(log.dictionaries["category"]) == ["x", "y"]
  assert log.items.set_index("item_id")["category_id"].to_dict() == {0: 1, 1: 0}


def test_an_empty_string_id_is_named(tmp_path):
  path = write(tmp_path / "log.csv", "u,i,t\nN1,B2,1\nN1,,2\n")
  with pytest.raises(DataError, match=r"log\.csv: column 'i' line 3: empty"):
    readers.read_source("csv", path, readers.CsvOptions("u", "i", "t"))


def test_uint64_ids_beyond_int64_are_refused_not_wrapped(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  path = tmp_path / "log.parquet"
  pq.write_table(pa.table({"u": pa.array([1, 2], pa.uint64()),
                           "i": pa.array([5, 2**63 + 7], pa.uint64())}), path)
  with pytest.raises(DataError, match=r"column 'i' row 2: id 9223372036854775815 does not fit"):
    readers.read_source("csv", path, readers.CsvOptions("u", "i"))


def test_empty_log_is_refused(tmp_path):
  write(tmp_path / "train_click_log.csv", "user_id,click_article_id,click_timestamp\n")
  write(tmp_path / "articles.csv", ARTICLES)
  with pytest.raises(DataError, match="has no rows"):
    readers.read_source("news", tmp_path)
  empty = write(tmp_path / "empty.txt", "")
  with pytest.raises(DataError, match=r"empty\.txt: file is empty"):
    readers.read_source("sasrec_txt", empty)


def test_duplicate_article_rows_are_refused(tmp_path):
  write(tmp_path / "train_click_log.csv", CLICKS)
  write(tmp_path / "articles.csv", ARTICLES + "101,9,9,9\n")
  with pytest.raises(DataError, match=r"articles\.csv: line 6: item id 101 appears more than"):
    readers.read_source("news", tmp_path)


def test_bad_date_is_named(tmp_path):
  path = write(tmp_path / "log.csv", "u,i,t\n1,2,2024-01-01\n1,3,yesterday\n")
  with pytest.raises(DataError, match=r"column 't': line 3: 'yesterday' is not in the format of "
                                      r"line 2: '2024-01-01': one date format per column"):
    readers.read_source("csv", path, readers.CsvOptions("u", "i", "t"))


def test_large_ids_are_exact(tmp_path):
  big = 2**62 + 1  # above float precision
  path = write(tmp_path / "x.txt", f"{big} 1\n{big} 2\n")
  log = readers.read_source("sasrec_txt", path)
  assert log.user_id.dtype == np.int64 and int(log.user_id[0]) == big


@pytest.mark.parametrize("source, name, line", [
    ("sasrec_txt", "log.txt.gz", "{u} {i}\n"),
    ("csv", "log.csv.gz", "{u},{i},{t}\n"),
])
def test_a_gzip_file_cut_short_is_named(tmp_path, source, name, line):
  # Random ids so that the stream does not compress to a few bytes.
  rng = np.random.default_rng(0)
  rows = "".join(line.format(u=u, i=i, t=t) for t, (u, i) in
                 enumerate(rng.integers(1, 10**9, size=(20000, 2))))
  header = "user,item,ts\n" if source == "csv" else ""
  whole = gzip.compress((header + rows).encode())
  path = tmp_path / name
  path.write_bytes(whole[:len(whole) // 2])  # as a copy stopped half-way leaves it
  options = readers.CsvOptions(user_col="user", item_col="item", time_col="ts")
  with pytest.raises(DataError, match=rf"^{path}: cannot read it \(.*\); is the file complete"):
    readers.read_source(source, path, options)


def test_sequences_reader_one_user_per_line(tmp_path):
  path = write(tmp_path / "Yelp.txt.gz", "u7 B1 B2 B3\n\nu2 B2  B9\n", compress=True)
  log = readers.read_source("sequences", path)
  users, items = log.dictionaries["user"], log.dictionaries["item"]
  assert list(zip(users[log.user_id], items[log.item_id])) == [
      ("u7", "B1"), ("u7", "B2"), ("u7", "B3"), ("u2", "B2"), ("u2", "B9")]
  assert log.ts.tolist() == [0, 1, 2, 3, 4] and log.time_unit == "order"
  ints = readers.read_source("sequences", write(tmp_path / "i.txt", "1 10 11\n2 10\n"))
  assert ints.user_id.tolist() == [1, 1, 2] and ints.item_id.tolist() == [10, 11, 10]


@pytest.mark.parametrize("text, message", [
    ("u1 a b\nu2\n", r"line 2: a user \(u2\) and no items"),
    ("u1 a b\nu2 c\nu1 d\n", r"line 3: user u1 already had line 1"),
])
def test_sequences_reader_bad_lines_are_named(tmp_path, text, message):
  path = write(tmp_path / "s.txt", text)
  with pytest.raises(DataError, match=rf"s\.txt: {message}"):
    readers.read_source("sequences", path)


RECBOLE = ("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
           "196\t242\t3\t881250949\n196\tB07\t4\t881250950.7\n22\t242\t1\t875747190\n")


def test_recbole_reader_named_typed_header(tmp_path):
  path = write(tmp_path / "ml.inter", RECBOLE)
  options = readers.CsvOptions(**readers.RECBOLE_DEFAULTS)
  log = readers.read_source("recbole", path, options)
  # item_id mixes 242 and B07: read as strings; user ids are integers.
  assert log.user_id.tolist() == [196, 196, 22]
  assert list(log.dictionaries["item"][log.item_id]) == ["242", "B07", "242"]
  assert log.ts.tolist() == [881250949, 881250950, 875747190] and log.time_unit == "s"


def test_recbole_header_without_types_is_refused(tmp_path):
  path = write(tmp_path / "ml.inter", "user_id\titem_id:token\n1\t2\n")
  with pytest.raises(DataError, match=r"ml\.inter: line 1: header field 'user_id' has no type"):
    readers.read_source("recbole", path, readers.CsvOptions(**readers.RECBOLE_DEFAULTS))


AMAZON = ('{"reviewerID": "A2", "asin": "B0001", "unixReviewTime": 1400000100, "overall": 5}\n'
          '{"reviewerID": "A1", "asin": "B0002", "unixReviewTime": 1400000000}\n'
          '{"reviewerID": "A2", "asin": "B0002", "unixReviewTime": 1400000000}\n')


def test_jsonl_reader_amazon_fields(tmp_path):
  path = write(tmp_path / "reviews.json.gz", AMAZON, compress=True)
  options = readers.CsvOptions("reviewerID", "asin", "unixReviewTime")
  log = readers.read_source("jsonl", path, options)
  assert list(log.dictionaries["user"][log.user_id]) == ["A2", "A1", "A2"]
  assert list(log.dictionaries["item"][log.item_id]) == ["B0001", "B0002", "B0002"]
  assert log.ts.tolist() == [1400000100, 1400000000, 1400000000]


@pytest.mark.parametrize("text, message", [
    (AMAZON + '{"reviewerID": "A3", "asin": \n', r"line 4: not JSON"),
    ('{"reviewerID": "A3"}\n', r"no field\(s\) \['asin', 'unixReviewTime'\]"),
])
def test_jsonl_bad_input_is_named(tmp_path, text, message):
  path = write(tmp_path / "r.json", text)
  with pytest.raises(DataError, match=rf"r\.json: {message}"):
    readers.read_source("jsonl", path, readers.CsvOptions("reviewerID", "asin", "unixReviewTime"))


def test_bytes_that_are_not_utf8_are_named(tmp_path):
  path = tmp_path / "log.csv"
  path.write_bytes(b"u,i,t\nA,B\xff\xfe,1\n")
  with pytest.raises(DataError, match=r"log\.csv: "):
    readers.read_source("csv", path, readers.CsvOptions("u", "i", "t"))


def _dates(tmp_path, values, time_format=""):
  rows = "".join(f"1,{i},{v}\n" for i, v in enumerate(values))
  path = write(tmp_path / "d.csv", "u,i,t\n" + rows)
  log = readers.read_source("csv", path, readers.CsvOptions("u", "i", "t",
                                                            time_format=time_format))
  return pd.to_datetime(log.ts, unit="s").strftime("%Y-%m-%d").tolist()


def test_day_first_dates_are_read_day_first_for_the_whole_column(tmp_path):
  # pandas' mixed format reads 01/10/2017 as 10 January and 13/10/2017 as 13 October.
  assert _dates(tmp_path, ["01/10/2017", "13/10/2017", "02/10/2017"]) == [
      "2017-10-01", "2017-10-13", "2017-10-02"]
  assert _dates(tmp_path, ["10/01/2017", "10/13/2017"]) == ["2017-10-01", "2017-10-13"]
  assert _dates(tmp_path, ["01/10/2017", "02/10/2017"], "%d/%m/%Y") == [
      "2017-10-01", "2017-10-02"]


@pytest.mark.parametrize("values, message", [
    (["01/10/2017", "02/10/2017"], r"whether line 2: '01/10/2017' is day/month or month/day "
                                   r"cannot be told .* pass --time_format"),
    (["13/10/2017", "10/13/2017"], r"dates with the day first \(line 2: '13/10/2017'\) and "
                                   r"with the month first \(line 3: '10/13/2017'\)"),
    (["1500000000", "2017-10-01"], r"mixes integer times \(line 2: '1500000000'\) and dates "
                                   r"\(line 3: '2017-10-01'\)"),
    # ISO beside day/month: the first date's format is the column's.
    (["2017-10-01", "2017-10-02", "13/10/2017"],
     r" line 4: '13/10/2017' is not in the format of line 2: '2017-10-01': one date format"),
    (["13/10/2017", "2017-10-01"],
     r" line 3: '2017-10-01' is not in the format of line 2: '13/10/2017': one date format"),
])
def test_dates_that_cannot_be_read_one_way_are_refused(tmp_path, values, message):
  with pytest.raises(DataError, match=rf"d\.csv: column 't'.*{message}"):
    _dates(tmp_path, values)


def test_movielens_string_ids_share_the_movies_vocabulary(tmp_path):
  ratings = write(tmp_path / "ratings.dat", "u1::m2::5::100\nu1::m1::3::200\nu2::m2::4::300\n")
  write(tmp_path / "movies.dat", "m1::Heat (1995)::Action|Crime\nm2::Up: a story::Comedy\n"
        "m3::Solaris::Drama\n")
  log = readers.read_source("movielens", ratings)
  items = log.dictionaries["item"]
  assert list(items[log.item_id]) == ["m2", "m1", "m2"]
  assert list(items[log.items.item_id]) == ["m1", "m2", "m3"]
  names = log.category_names.set_index("category_id").name
  assert list(names[log.items.category_id]) == ["Action", "Comedy", "Drama"]


@pytest.mark.parametrize("source", ["csv", "sasrec_txt", "sequences", "recbole", "jsonl"])
def test_a_directory_where_a_file_is_read_is_named_as_one(tmp_path, source):
  (tmp_path / "logs").mkdir()
  engines = " (--engine=ray reads every CSV or Parquet file of a directory)" \
      if source == "csv" else ""
  with pytest.raises(DataError, match=rf"^{tmp_path / 'logs'}: a directory; --source={source} "
                                      rf"reads one file{re.escape(engines)}$"):
    readers.read_source(source, tmp_path / "logs", readers.CsvOptions("u", "i", "t"))
  with pytest.raises(DataError, match=rf"^{tmp_path / 'none.csv'}: file not found$"):
    readers.read_source(source, tmp_path / "none.csv", readers.CsvOptions("u", "i", "t"))


def test_a_column_the_job_reads_twice_in_the_header_is_refused(tmp_path):
  path = write(tmp_path / "log.csv", "u,i,t,t,x,x\n1,2,3,4,5,6\n")
  with pytest.raises(DataError, match=rf"^{path}: column 't' appears 2 times in the header "
                                      r"\(u, i, t, t, x, x\); which one holds the data"):
    readers.read_source("csv", path, readers.CsvOptions("u", "i", "t"))
  # Repeated columns the job does not read are no concern of it.
  assert readers.read_source("csv", path, readers.CsvOptions("u", "i")).item_id.tolist() == [2]
  parquet = tmp_path / "log.parquet"
  pq.write_table(pa.table([[1], [2], [3], [4]], names=["u", "i", "t", "t"]), parquet)
  with pytest.raises(DataError, match=rf"^{parquet}: column 't' appears 2 times"):
    readers.read_source("csv", parquet, readers.CsvOptions("u", "i", "t"))


def _times(tmp_path, values, time_unit="s"):
  path = write(tmp_path / "t.csv", "u,i,t\n" + "".join(f"1,{i},{v}\n" for i, v in
                                                      enumerate(values)))
  return readers.read_source("csv", path, readers.CsvOptions("u", "i", "t",
                                                             time_unit=time_unit)).ts.tolist()


def test_a_time_column_mixing_epoch_units_is_refused(tmp_path):
  # 1600000000 s is 2020-09-13; 1600000060000 ms is a minute later, and read
  # as seconds it is the year 52672: sorting would put it after everything.
  with pytest.raises(DataError, match=rf"^{tmp_path / 't.csv'}: column 't' mixes epoch seconds "
                                      r"\(line 3: 1600000000\) and epoch milliseconds \(line 4: "
                                      r"1600000060000\), 1000x apart: .* --time_unit=order"):
    _times(tmp_path, [5, 1600000000, 1600000060000, 1600000120])
  with pytest.raises(DataError, match=r"epoch milliseconds \(line 2: 1600000000000\) and epoch "
                                      r"microseconds \(line 3: 1600000060000000\), 1000x apart"):
    _times(tmp_path, [1600000000000, 1600000060000000], time_unit="ms")


def test_times_in_one_unit_or_counters_are_not_mixed_units(tmp_path):
  # Small counters are in no unit's band of plausible dates (1973-2286).
  assert _times(tmp_path, [1, 2, 100, 99999999]) == [1, 2, 100, 99999999]
  # Seconds from 1973 to 2286, and a 0 beside them, are one unit.
  assert _times(tmp_path, [0, 100000000, 9999999999]) == [0, 100000000, 9999999999]
  # A counter that happens to span the bands is read as one with --time_unit=order.
  assert _times(tmp_path, [1600000000, 1600000060000], "order") == [1600000000, 1600000060000]
  # Dates are converted to one unit whatever their range.
  assert _times(tmp_path, ["1971-01-01", "2200-01-01"]) == [31536000, 7258118400]
