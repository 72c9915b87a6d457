"""Interaction-log loaders: CSV/TSV, RecBole ``.inter``, ComiRec ``user,item,category,time``, Parquet.

Every loader returns an :class:`Interactions` (three aligned 1-D numpy arrays: user and item ids
as int64, timestamps as float64). Bad input raises ``ValueError`` naming the file, the column and
the first offending line; rows that are skipped (blank lines) are counted in the log. RecBole
files may hold string tokens as ids: they are remapped to integers and the token vocabulary is
kept on the :class:`Interactions` (``user_tokens`` / ``item_tokens``).
"""
from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

log = logging.getLogger("seqrec_fast.data")

FORMATS = ("auto", "csv", "tsv", "recbole", "comirec", "parquet")


@dataclass
class Interactions:
    """Raw interaction log. user: (n,) int64; item: (n,) int64; time: (n,) float64;
    category: (n,) int64 or None (ComiRec files carry one per interaction).

    user_tokens / item_tokens: (n_tokens,) str arrays or None. When set, the ids in ``user`` /
    ``item`` were remapped from string tokens and index into them: the token of raw item id j is
    ``item_tokens[j]`` (RecBole files with non-integer tokens; None for integer ids)."""
    user: np.ndarray
    item: np.ndarray
    time: np.ndarray
    category: Optional[np.ndarray] = None
    user_tokens: Optional[np.ndarray] = None
    item_tokens: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return int(self.user.shape[0])

    def __post_init__(self):
        n = self.user.shape[0]
        for name in ("item", "time"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"{name} must have shape ({n},), got {getattr(self, name).shape}")
        if self.category is not None and self.category.shape != (n,):
            raise ValueError(f"category must have shape ({n},), got {self.category.shape}")
        for name, ids in (("user_tokens", self.user), ("item_tokens", self.item)):
            tok = getattr(self, name)
            if tok is None:
                continue
            tok = np.asarray(tok)
            if tok.ndim != 1:
                raise ValueError(f"{name} must be 1-D, got shape {tok.shape}")
            if n and (ids.min() < 0 or ids.max() >= tok.shape[0]):
                raise ValueError(f"{name} has {tok.shape[0]} entries but the ids range over "
                                 f"[{ids.min()}, {ids.max()}]")
            setattr(self, name, tok.astype(str))


def _check_path(path) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"path {path!r} does not exist or is not a file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"path {path!r} is empty")
    return path


def _to_int(values: Sequence[str], column: str, path: str, first_line: int) -> np.ndarray:
    arr = np.asarray(values)
    try:
        return arr.astype(np.int64)
    except (ValueError, OverflowError):
        pass
    for i, v in enumerate(values):  # only on the error path: find the first bad value
        try:
            int(v)
        except (ValueError, OverflowError):
            raise ValueError(f"{path}: column {column!r} must hold integer ids, got {v!r} on "
                             f"line {first_line + i}") from None
    raise ValueError(f"{path}: column {column!r} could not be read as int64")


def _to_ids(values: Sequence[str], column: str, path: str, first_line: int):
    """Token column -> (int64 ids, tokens or None). A column whose every value is an int64 keeps
    those integers as ids (tokens None); otherwise every value is a string token and the ids are
    the positions of the tokens in their sorted vocabulary (tokens: (n_tokens,) str)."""
    for i, v in enumerate(values):
        if v == "":
            raise ValueError(f"{path}: column {column!r} has an empty token on line "
                             f"{first_line + i}")
    arr = np.asarray(values)
    try:
        return arr.astype(np.int64), None
    except (ValueError, OverflowError):
        pass
    tokens, ids = np.unique(arr, return_inverse=True)
    return ids.reshape(-1).astype(np.int64), tokens


def _to_float(values: Sequence[str], column: str, path: str, first_line: int) -> np.ndarray:
    try:
        return np.asarray(values).astype(np.float64)
    except ValueError:
        for i, v in enumerate(values):
            try:
                float(v)
            except ValueError:
                raise ValueError(f"{path}: column {column!r} must hold numbers, got {v!r} on "
                                 f"line {first_line + i}") from None
        raise


def _read_table(path: str, sep: str, header: bool, names: Optional[Sequence[str]]):
    """-> (column names, list of rows as lists of str, first data line number, blank rows)."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter=sep)
        rows = list(reader)
    blank = sum(1 for r in rows if not r or all(not c.strip() for c in r))
    if header:
        while rows and (not rows[0] or all(not c.strip() for c in rows[0])):
            rows.pop(0)
        if not rows:
            raise ValueError(f"{path}: the file has no header line")
        cols = [c.strip() for c in rows.pop(0)]
        first = 2
    else:
        if names is None:
            raise ValueError("names must be given when header=False")
        cols = list(names)
        first = 1
    rows = [r for r in rows if r and any(c.strip() for c in r)]
    if blank:
        log.info("%s: skipped %d blank line(s)", path, blank)
    if not rows:
        raise ValueError(f"{path}: the file has no data rows")
    return cols, rows, first


def _columns(path, cols, rows, first, wanted: dict, optional=()):
    """wanted: role -> column name. Returns role -> list of str values."""
    index = {c: i for i, c in enumerate(cols)}
    missing = [name for role, name in wanted.items() if name not in index and role not in optional]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; the file has columns {cols}")
    ncol = len(cols)
    for i, r in enumerate(rows):
        if len(r) != ncol:
            raise ValueError(f"{path}: line {first + i} has {len(r)} fields, the header has {ncol}")
    out = {}
    for role, name in wanted.items():
        if name in index:
            j = index[name]
            out[role] = [r[j].strip() for r in rows]
    return out


def load_csv(path, *, user_col: str = "user_id", item_col: str = "item_id",
             time_col: Optional[str] = "timestamp", sep: str = ",", header: bool = True,
             names: Optional[Sequence[str]] = None) -> Interactions:
    """CSV/TSV log with a header (or ``names`` when ``header=False``).

    user_col / item_col: integer id columns (required). time_col: numeric timestamps, or None
    (then the file order is the time order). Returns Interactions with n rows.
    Raises ValueError for a missing file/column, an empty file, a non-integer id, a ragged row.
    """
    path = _check_path(path)
    for name, v in (("user_col", user_col), ("item_col", item_col), ("sep", sep)):
        if not isinstance(v, str) or not v:
            raise TypeError(f"{name} must be a non-empty str, got {v!r}")
    cols, rows, first = _read_table(path, sep, header, names)
    wanted = {"user": user_col, "item": item_col}
    if time_col is not None:
        wanted["time"] = time_col
    vals = _columns(path, cols, rows, first, wanted)
    user = _to_int(vals["user"], user_col, path, first)
    item = _to_int(vals["item"], item_col, path, first)
    if time_col is not None:
        time = _to_float(vals["time"], time_col, path, first)
    else:
        time = np.arange(len(user), dtype=np.float64)
    log.info("%s: loaded %d interactions", path, len(user))
    return Interactions(user, item, time)


def load_recbole(path, *, user_field: str = "user_id", item_field: str = "item_id",
                 time_field: Optional[str] = "timestamp") -> Interactions:
    """RecBole atomic ``.inter`` file: tab-separated, header ``name:type`` (e.g.
    ``user_id:token  item_id:token  rating:float  timestamp:float``).

    ``:token`` fields are strings in RecBole. Each of the user and item fields is read on its
    own: when every value is an integer (ml-1m) the integers are the ids, unchanged, and the
    matching ``*_tokens`` is None; otherwise (e.g. Amazon ASINs such as ``B000GFDAUG``) the
    field's tokens are remapped to dense ids 0..T-1 in sorted token order (deterministic, not
    dependent on the row order) and the vocabulary is kept as ``Interactions.user_tokens`` /
    ``item_tokens`` (``item_tokens[id]`` is the token). :func:`~seqrec_fast.data.preprocess`
    carries the item tokens over to ``Dataset.item_tokens`` (indexed by the final, popularity
    sorted item id, "" for padding), and the .npz cache keeps them. The number of distinct
    tokens remapped is logged. An empty token or a missing field is a ValueError naming the
    field (and the line)."""
    path = _check_path(path)
    cols, rows, first = _read_table(path, "\t", True, None)
    names = [c.split(":", 1)[0] for c in cols]
    if time_field is not None and time_field not in names:
        log.warning("%s: no %r field, using file order as time order", path, time_field)
        time_field = None
    wanted = {"user": user_field, "item": item_field}
    if time_field is not None:
        wanted["time"] = time_field
    vals = _columns(path, names, rows, first, wanted)
    user, user_tokens = _to_ids(vals["user"], user_field, path, first)
    item, item_tokens = _to_ids(vals["item"], item_field, path, first)
    time = (_to_float(vals["time"], time_field, path, first) if time_field is not None
            else np.arange(len(user), dtype=np.float64))
    for field, tok in ((user_field, user_tokens), (item_field, item_tokens)):
        if tok is not None:
            log.info("%s: remapped %d distinct %r token(s) to integer ids", path, len(tok), field)
    log.info("%s: loaded %d interactions (RecBole)", path, len(user))
    return Interactions(user, item, time, user_tokens=user_tokens, item_tokens=item_tokens)


def load_comirec(path) -> Interactions:
    """ComiRec's data files: comma-separated ``user,item,category,time`` without a header."""
    path = _check_path(path)
    cols, rows, first = _read_table(path, ",", False, ["user", "item", "category", "time"])
    vals = _columns(path, cols, rows, first,
                    {"user": "user", "item": "item", "category": "category", "time": "time"})
    return Interactions(_to_int(vals["user"], "user", path, first),
                        _to_int(vals["item"], "item", path, first),
                        _to_float(vals["time"], "time", path, first),
                        _to_int(vals["category"], "category", path, first))


def load_parquet(path, *, user_col: str = "user_id", item_col: str = "item_id",
                 time_col: Optional[str] = "timestamp") -> Interactions:
    """Parquet file (needs pyarrow: ``pip install seqrec_fast[parquet]``)."""
    path = _check_path(path)
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ImportError("reading Parquet needs pyarrow: pip install 'seqrec_fast[parquet]'") from exc
    table = pq.read_table(path)
    cols = table.column_names
    need = [c for c in (user_col, item_col, time_col) if c is not None]
    missing = [c for c in need if c not in cols]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; the file has columns {cols}")
    if table.num_rows == 0:
        raise ValueError(f"{path}: the file has no data rows")

    def ints(c):
        a = table.column(c).to_numpy()
        if not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{path}: column {c!r} must hold integer ids, got dtype {a.dtype}")
        return a.astype(np.int64)

    time = (table.column(time_col).to_numpy().astype(np.float64) if time_col is not None
            else np.arange(table.num_rows, dtype=np.float64))
    return Interactions(ints(user_col), ints(item_col), time)


def load_interactions(path, format: str = "auto", **kwargs) -> Interactions:
    """Load a log, picking the loader from ``format`` or the file extension
    (.inter → recbole, .tsv → tsv, .parquet → parquet, .txt without header → comirec, else csv).
    kwargs go to the loader (column names, ``sep``)."""
    if not isinstance(format, str) or format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    p = os.fspath(path) if isinstance(path, (str, os.PathLike)) else path
    if format == "auto":
        ext = os.path.splitext(str(p))[1].lower()
        format = {".inter": "recbole", ".tsv": "tsv", ".parquet": "parquet",
                  ".txt": "comirec"}.get(ext, "csv")
    if format == "recbole":
        return load_recbole(p, **kwargs)
    if format == "comirec":
        return load_comirec(p)
    if format == "parquet":
        return load_parquet(p, **kwargs)
    if format == "tsv":
        kwargs.setdefault("sep", "\t")
    return load_csv(p, **kwargs)
