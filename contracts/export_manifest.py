"""What the trainer's export directory holds: read without TensorFlow.

trainer/export.py writes it; the retrieval job reads it through `load_info`
(retrieval models), ranking users through `load_ranker_info` (dien).
"""

import dataclasses
import json
from pathlib import Path

from contracts import manifest as mf
from contracts.errors import DataError
from contracts.fileio import sha256_file

EXPORT_DIR = "export"
EXPORT_MANIFEST = "export_manifest.json"
USER_TOWER = "user_tower"
ITEM_EMBEDDINGS = "item_embeddings.npy"
RANKER = "ranker"


@dataclasses.dataclass(frozen=True)
class ExportInfo:
  model: str
  emb_dim: int
  max_seq_len: int
  num_items: int
  num_users: int
  data_dir: str
  data_fingerprint: str  # SHA-256 of the data's vocab/items.parquet
  global_step: int  # the step exported: the best evaluation when the run selected one
  user_tower: str = USER_TOWER
  item_embeddings: str = ITEM_EMBEDDINGS
  # SHA-256 of every vocabulary the model's inputs are indices of, by name
  # (VOCABULARY_FILES); an export without it knows only the items.
  vocab_fingerprints: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class RankerExportInfo:
  model: str
  max_hist_len: int
  dense_features: tuple[str, ...]  # order of the `dense` input (raw values)
  num_items: int
  num_users: int
  data_dir: str
  data_fingerprint: str
  global_step: int
  ranker: str = RANKER
  vocab_fingerprints: dict = dataclasses.field(default_factory=dict)


VOCABULARY_FILES = {"items": mf.ITEMS_FILE, "users": mf.USERS_FILE}


def data_fingerprint(manifest: mf.Manifest | mf.RankingManifest) -> str:
  """SHA-256 of the data's item vocabulary: a model only fits data with the same one."""
  return sha256_file(manifest.path(mf.ITEMS_FILE))


def vocab_fingerprints(manifest: mf.Manifest | mf.RankingManifest,
                       names: tuple[str, ...]) -> dict[str, str]:
  """{name: SHA-256 of the data's vocabulary file} for the vocabularies `names`."""
  return {name: sha256_file(manifest.path(VOCABULARY_FILES[name])) for name in names}


def check_vocabularies(model_dir: Path | str, info: "ExportInfo | RankerExportInfo",
                       manifest: mf.Manifest | mf.RankingManifest) -> None:
  """DataError naming the first vocabulary of the export that the data does not
  share: the items, or the users re-keyed under the same items (a user
  embedding would then score another user)."""
  for name, sha in (info.vocab_fingerprints or {"items": info.data_fingerprint}).items():
    if name not in VOCABULARY_FILES:
      raise DataError(f"{Path(model_dir)}: the export depends on a vocabulary {name!r} this "
                      "version does not know")
    if vocab_fingerprints(manifest, (name,))[name] != sha:
      raise DataError(f"{Path(model_dir)}: the model was trained on another {name[:-1]} "
                      f"vocabulary ({info.data_dir}) than {manifest.data_dir}; "
                      f"{VOCABULARY_FILES[name]} differs")


def load_info(model_dir: Path | str) -> ExportInfo:
  """Reads model_dir/export/export_manifest.json (errors name what is missing)."""
  path, d = _read(model_dir)
  if d.get("model") == "dien":
    raise DataError(f"{Path(model_dir)}: holds a ranker (dien), not a retrieval model")
  try:
    return ExportInfo(**d)
  except TypeError as e:
    raise DataError(f"{path}: malformed export manifest ({e})") from e


def load_ranker_info(model_dir: Path | str) -> RankerExportInfo:
  path, d = _read(model_dir)
  if d.get("model") != "dien":
    raise DataError(f"{Path(model_dir)}: holds a retrieval model ({d.get('model')}), not a ranker")
  try:
    return RankerExportInfo(**{**d, "dense_features": tuple(d["dense_features"])})
  except (KeyError, TypeError) as e:
    raise DataError(f"{path}: malformed export manifest ({e})") from e


def _read(model_dir: Path | str) -> tuple[Path, dict]:
  """The export manifest's path and contents; DataError when it is missing or not JSON."""
  path = Path(model_dir) / EXPORT_DIR / EXPORT_MANIFEST
  if not path.is_file():
    raise DataError(f"{Path(model_dir)}: no {EXPORT_DIR}/{EXPORT_MANIFEST} (not a trainer "
                    "model_dir, or training has not finished)")
  try:
    return path, json.loads(path.read_text())
  except ValueError as e:
    raise DataError(f"{path}: malformed export manifest ({e})") from e
