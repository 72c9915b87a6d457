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


def _read_table(path: str, sep: str, header: bool, names: Optional[Sequence[str]],
                source=None):
    """-> (column names, list of rows as lists of str, first data line number, blank rows).
    source: an open text stream to read instead of ``path`` (``path`` names it in messages)."""
    if source is not None:
        rows = list(csv.reader(source, delimiter=sep))
    else:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f, delimiter=sep))
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


# Column names recognised when none is given (case-insensitive): the usual spellings of
# MovieLens, RecBole, Amazon, Taobao and ComiRec exports.
ALIASES = {
    "user": ("user_id", "userid", "user", "uid", "customer_id", "visitorid", "reviewerid"),
    "item": ("item_id", "itemid", "item", "iid", "movieid", "movie_id", "product_id", "asin",
             "artist_id", "track_id"),
    "time": ("timestamp", "time", "ts", "datetime", "date", "unixreviewtime",
             "event_time"),
}
FLAGS = {"user": "user_col", "item": "item_col", "time": "time_col"}


def _first_lines(path: str, n: int = 2):
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                out.append(line.rstrip("\r\n"))
                if len(out) == n:
                    break
    return out


def _sniff_sep(path: str, line: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext in (".tsv", ".inter", ".data", ".tab"):
        return "\t"
    for c in ("\t", "::", ",", ";", "|"):
        if c in line:
            return c
    return " " if " " in line else ","


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _detect_header(first, second, sep, roles) -> bool:
    """A first line names the columns when it names a requested column, or when none of its
    fields is a number while the next line has numbers."""
    f = [c.strip() for c in first.split(sep)]
    if any(isinstance(v, str) and not v.isdigit() and v in f for v in roles.values()):
        return True
    low = {c.lower() for c in f}
    if any(a in low for al in ALIASES.values() for a in al):
        return True
    if any(_is_number(c) for c in f):
        return False
    return second is not None and any(_is_number(c.strip()) for c in second.split(sep))


def _resolve(path, cols, header, roles):
    """roles: role -> the given column (name, index as int / digit string, None: detect, or
    "none" for time). -> role -> column position (time may be None: file order)."""
    pos = {}
    low = {c.lower(): i for i, c in enumerate(cols)}
    missing = []
    for role in ("user", "item", "time"):
        want = roles.get(role)
        if role == "time" and isinstance(want, str) and want.lower() == "none":
            pos[role] = None
            continue
        if isinstance(want, int) or (isinstance(want, str) and want.isdigit()):
            j = int(want)
            if not 0 <= j < len(cols):
                raise ValueError(f"{path}: {FLAGS[role]}={want} but the file has {len(cols)} "
                                 f"column(s)")
            pos[role] = j
        elif want is not None:
            if want in cols:
                pos[role] = cols.index(want)
            else:
                missing.append(want)
        elif header:
            hit = [low[a] for a in ALIASES[role] if a in low]
            pos[role] = hit[0] if hit else None
            if pos[role] is None and role != "time":
                missing.append(role + "_id")
        else:   # no header: user, item, then the timestamp last (as ComiRec's files, u.data)
            pos[role] = {"user": 0, "item": 1}.get(role, len(cols) - 1 if len(cols) >= 3
                                                    else None)
            if pos[role] is not None and pos[role] >= len(cols):
                raise ValueError(f"{path}: the file has {len(cols)} column(s); it needs a user "
                                 f"and an item column")
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; the file has columns {cols}. "
                         f"Name them with user_col / item_col / time_col")
    if pos["user"] == pos["item"]:
        raise ValueError(f"{path}: the user and item columns are the same column "
                         f"({cols[pos['user']]!r})")
    return pos


def _arrow_table(path, sep, header, ncols, source=None):
    """The file through pyarrow's multithreaded CSV reader, or None (no pyarrow, or a file it
    rejects: the csv-module path then reports the problem line by line)."""
    try:
        import pyarrow as pa
        import pyarrow.csv as pacsv
    except ImportError:
        return None
    names = None if header else [str(i) for i in range(ncols)]
    try:
        return pacsv.read_csv(
            path if source is None else source, read_options=pacsv.ReadOptions(column_names=names, block_size=1 << 24),
            parse_options=pacsv.ParseOptions(delimiter=sep),
            convert_options=pacsv.ConvertOptions(strings_can_be_null=False))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, UnicodeDecodeError) as exc:
        log.debug("%s: pyarrow could not read the file (%s); using the csv module", path, exc)
        return None


def _arrow_ids(col, name, path):
    """A pyarrow column -> (int64 ids, tokens or None), as :func:`_to_ids`."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if col.null_count:
        return None
    if pa.types.is_integer(col.type):
        return col.to_numpy().astype(np.int64, copy=False), None
    if not pa.types.is_string(col.type) and not pa.types.is_large_string(col.type):
        return None            # floats, dates...: tokens exactly as written, by the slow path
    if pc.any(pc.equal(pc.utf8_length(col), 0)).as_py():
        return None                               # empty tokens: reported by the slow path
    enc = col.dictionary_encode()
    vocab = np.asarray(enc.dictionary.to_pylist(), dtype=str)
    order = np.argsort(vocab, kind="stable")      # ids in sorted token order (as _to_ids)
    rank = np.empty(len(vocab), dtype=np.int64)
    rank[order] = np.arange(len(vocab))
    return rank[enc.indices.to_numpy()], vocab[order]


def _arrow_time(col):
    import pyarrow as pa
    import pyarrow.compute as pc

    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if col.null_count:
        return None
    if pa.types.is_timestamp(col.type) or pa.types.is_date(col.type):
        col = pc.cast(pc.cast(col, pa.timestamp("s")), pa.int64())
    if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
        return None
    return col.to_numpy().astype(np.float64)


def load_csv(path, *, user_col=None, item_col=None, time_col=None, sep: Optional[str] = None,
             header: Optional[bool] = None,
             names: Optional[Sequence[str]] = None) -> Interactions:
    """Delimited log (CSV, TSV, MovieLens ``u.data``, ...) -> Interactions with n rows.

    user_col / item_col / time_col: a column name, or a 0-based column index (a file without
    header). None picks the usual names (``user_id``/``userId``/``user``...,
    ``item_id``/``movieId``/``item``..., ``timestamp``/``time``...); without a header: user in
    column 0, item in column 1, the timestamp in the last column when there are 3 or more.
    ``time_col="none"`` (or no timestamp column found) makes the file order the time order.
    sep: None sniffs it (tab for .tsv/.data, else the first of tab :: , ; | in the first
    line); several characters (MovieLens-1M's ``::``) are fine.
    header: None detects it; ``names`` gives column names to a file without header.
    Ids may be integers (kept as they are) or any strings (remapped to dense ids in sorted
    token order; ``Interactions.user_tokens`` / ``item_tokens`` keep the tokens), as for
    RecBole files. Timestamps: numbers or ISO dates.

    Read with pyarrow's multithreaded CSV reader when pyarrow is installed, else with the csv
    module (timings in bench/NOTES.md). Raises ValueError naming the file, the column and the line for a
    missing file or column, an empty file, a ragged row, a non-numeric timestamp.
    """
    path = _check_path(path)
    for name, v in (("user_col", user_col), ("item_col", item_col), ("time_col", time_col)):
        if v is not None and not (isinstance(v, str) and v) and not (
                isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            raise TypeError(f"{name} must be a column name or a 0-based index, got {v!r}")
    if sep is not None and (not isinstance(sep, str) or not sep or "\n" in sep):
        raise ValueError(f"sep must be a non-empty str, got {sep!r}")
    lines = _first_lines(path)
    if not lines:
        raise ValueError(f"path {path!r} is empty")
    sep = sep or _sniff_sep(path, lines[0])
    roles = {"user": user_col, "item": item_col, "time": time_col}
    if names is not None:
        header = False if header is None else header
    if header is None:
        header = _detect_header(lines[0], lines[1] if len(lines) > 1 else None, sep, roles)
    ncols = len(lines[0].split(sep))
    cols = ([c.strip() for c in lines[0].split(sep)] if header
            else list(names) if names is not None else [str(i) for i in range(ncols)])
    if names is not None and header:
        raise ValueError("names is for a file without header (header=False)")
    pos = _resolve(path, cols, header, roles)
    src = text = None
    if len(sep) > 1:       # e.g. MovieLens-1M's "::": one unused character instead, in memory
        with open(path, "rb") as f:
            raw = f.read().replace(sep.encode(), b"\x1f")
        sep, src, text = "\x1f", raw, raw.decode("utf-8")
    got = None
    if names is None:
        import io

        table = _arrow_table(path, sep, header, ncols,
                             None if src is None else io.BytesIO(src))
        if table is not None and table.num_columns == len(cols):
            if table.num_rows == 0:
                raise ValueError(f"{path}: the file has no data rows")
            u = _arrow_ids(table.column(pos["user"]), cols[pos["user"]], path)
            i = _arrow_ids(table.column(pos["item"]), cols[pos["item"]], path)
            t = (np.arange(table.num_rows, dtype=np.float64) if pos["time"] is None
                 else _arrow_time(table.column(pos["time"])))
            if u is not None and i is not None and t is not None:
                got = (u, i, t)
    if got is None:                               # csv module: also the precise error path
        import io

        cols2, rows, first = _read_table(path, sep, header, cols if not header else None,
                                         None if text is None else io.StringIO(text,
                                                                               newline=""))
        wanted = {r: cols[j] for r, j in pos.items() if j is not None}
        vals = _columns(path, cols2 if header else cols, rows, first, wanted)
        u = _to_ids(vals["user"], cols[pos["user"]], path, first)
        i = _to_ids(vals["item"], cols[pos["item"]], path, first)
        t = (np.arange(len(rows), dtype=np.float64) if pos["time"] is None
             else _to_float(vals["time"], cols[pos["time"]], path, first))
        got = (u, i, t)
    (user, user_tokens), (item, item_tokens), time = got
    if pos["time"] is None:
        log.info("%s: no timestamp column: the file order is the time order", path)
    for role, tok in (("user", user_tokens), ("item", item_tokens)):
        if tok is not None:
            log.info("%s: remapped %d distinct %s token(s) to integer ids", path, len(tok), role)
    log.info("%s: loaded %d interactions", path, len(user))
    return Interactions(user, item, time, user_tokens=user_tokens, item_tokens=item_tokens)


def _token_index(tokens) -> Optional[dict]:
    """A loaded column's tokens (``Interactions.user_tokens`` / ``item_tokens``) -> {token: id},
    or None when the column held integer ids."""
    return None if tokens is None else {t: i for i, t in enumerate(tokens.tolist())}


def _side_file_id(raw: str, tok: Optional[dict], what: str, path: str, n: int):
    """A user / item id as a side file (user split, item categories) writes it -> the data's id:
    through ``tok`` (:func:`_token_index`; None for an id absent from the data), else as an
    integer."""
    if tok is not None:
        return tok.get(raw)
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{path}: line {n}: {what} {raw!r} is not an integer id (the data's "
                         f"{what} ids are integers)") from None


def read_user_split(path, inter: Optional[Interactions] = None) -> dict:
    """A ready-made user split: lines ``user<sep>split`` (sep , or tab or spaces; an optional
    header; split: train | valid | test) -> {raw user id: split}. With ``inter``, users given
    as tokens are mapped to its ids (files whose user ids were strings)."""
    path = _check_path(path)
    out = {}
    tok = _token_index(inter.user_tokens) if inter is not None else None
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            parts = line.replace(",", " ").replace("\t", " ").split()
            if not parts:
                continue
            if len(parts) != 2:
                raise ValueError(f"{path}: line {n} must be 'user,split', got {line.strip()!r}")
            u, sp = parts
            if sp not in ("train", "valid", "test"):
                if n == 1:
                    continue                       # a header
                raise ValueError(f"{path}: line {n}: split must be train, valid or test, got "
                                 f"{sp!r}")
            user = _side_file_id(u, tok, "user", path, n)
            if user is not None:                   # None: a user absent from the data
                out[user] = sp
    if not out:
        raise ValueError(f"{path}: no 'user,split' line")
    return out


CATEGORY_ALIASES = ("category", "categories", "cate", "cate_id", "category_id", "genre",
                    "genres", "class", "label")


def read_item_categories(path, inter: Optional[Interactions] = None, *, item_col=None,
                         category_col=None, sep: Optional[str] = None) -> dict:
    """An item -> category map file -> {raw item id: category index}.

    Layouts: ComiRec's ``item_cate.txt`` (``item,cate`` lines, no header), RecBole's ``.item``
    file (tab-separated, a header of ``name:type`` fields; the category field is found by name),
    or a CSV / TSV with a header (columns found by name, or given: ``item_col`` /
    ``category_col`` as a name or a 0-based index). Without a header the item is column 0 and
    the category column 1. A multi-valued category (RecBole ``token_seq``, MovieLens'
    ``Action|Comedy``) takes its first value. Categories are tokens (numbers or strings), numbered
    0.. in sorted order of their text. With ``inter``, items given as tokens are mapped to its
    ids (files whose item ids were strings); items absent from the data are ignored. An item
    listed twice keeps its first line (and the count is logged).
    """
    path = _check_path(path)
    lines = _first_lines(path, 2)
    if not lines:
        raise ValueError(f"{path}: the file is empty")
    if sep is None:
        sep = _sniff_sep(path, lines[0])
    first = [c.strip() for c in lines[0].split(sep)]
    names = [c.split(":", 1)[0] for c in first]                 # RecBole's name:type
    low = [c.lower() for c in names]
    wanted_names = [c for c in (item_col, category_col) if isinstance(c, str) and not c.isdigit()]
    header = (any(":" in c for c in first) or any(c in names for c in wanted_names)
              or any(c in low for c in CATEGORY_ALIASES + ALIASES["item"]))

    def pick(given, aliases, default, what):
        if isinstance(given, int) or (isinstance(given, str) and given.isdigit()):
            j = int(given)
            if not 0 <= j < len(first):
                raise ValueError(f"{path}: {what}={given} but the file has {len(first)} column(s)")
            return j
        if given is not None:
            if given not in names:
                raise ValueError(f"{path}: no column {given!r}; the file has columns {names}")
            return names.index(given)
        if header:
            hit = [low.index(a) for a in aliases if a in low]
            if not hit:
                raise ValueError(f"{path}: no {what[:-4]} column among {names}; name it with "
                                 f"{what}")
            return hit[0]
        return default

    ji = pick(item_col, ALIASES["item"], 0, "item_col")
    jc = pick(category_col, CATEGORY_ALIASES, 1, "category_col")
    if ji == jc:
        raise ValueError(f"{path}: the item and category columns are the same column")
    tok = _token_index(inter.item_tokens) if inter is not None else None
    raw_items, raw_cats, repeated = [], [], 0
    seen = set()
    with open(path, newline="", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if header and n == 1 or not line.strip():
                continue
            parts = [c.strip() for c in line.rstrip("\r\n").split(sep)]
            if max(ji, jc) >= len(parts):
                raise ValueError(f"{path}: line {n} has {len(parts)} field(s), needs column "
                                 f"{max(ji, jc)}")
            it, cat = parts[ji], parts[jc]
            cat = cat.replace("|", " ").split()[0] if cat.strip() else ""
            if not cat:
                continue
            item = _side_file_id(it, tok, "item", path, n)
            if item is None:                       # an item absent from the data
                continue
            if item in seen:
                repeated += 1
                continue
            seen.add(item)
            raw_items.append(item)
            raw_cats.append(cat)
    if not raw_items:
        raise ValueError(f"{path}: no item with a category")
    if repeated:
        log.info("%s: %d item(s) listed more than once kept their first category", path, repeated)
    cats = sorted(set(raw_cats))
    index = {c: i for i, c in enumerate(cats)}
    return {i: index[c] for i, c in zip(raw_items, raw_cats)}


def with_item_categories(inter: Interactions, categories: dict) -> Interactions:
    """``inter`` with its per-interaction ``category`` taken from an item -> category map
    ({raw item id: category}, e.g. :func:`read_item_categories`); items the map lacks get -1
    (unknown). A category the log itself carried is replaced (the map wins)."""
    if not categories:
        raise ValueError("categories is empty")
    keys = np.fromiter(categories.keys(), dtype=np.int64, count=len(categories))
    vals = np.fromiter(categories.values(), dtype=np.int64, count=len(categories))
    order = np.argsort(keys)
    keys, vals = keys[order], vals[order]
    pos = np.searchsorted(keys, inter.item).clip(max=len(keys) - 1)
    cat = np.where(keys[pos] == inter.item, vals[pos], -1).astype(np.int64)
    if inter.category is not None:
        log.info("the item-category map replaces the categories the interaction log carried")
    known = float((cat >= 0).mean()) if len(cat) else 0.0
    if known < 1.0:
        log.info("%.1f%% of the interactions' items have no category in the map", 100 * (1 - known))
    return Interactions(inter.user, inter.item, inter.time, cat, inter.user_tokens,
                        inter.item_tokens)


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
    lines = _first_lines(path, 1)
    if not lines:
        raise ValueError(f"path {path!r} is empty")
    names = [c.strip().split(":", 1)[0] for c in lines[0].split("\t")]
    if time_field is not None and time_field not in names:
        log.warning("%s: no %r field, using file order as time order", path, time_field)
        time_field = None
    got = None
    if user_field in names and item_field in names:
        table = _arrow_table(path, "\t", True, len(names))   # the columnar fast path
        if table is not None and table.num_columns == len(names) and table.num_rows:
            u = _arrow_ids(table.column(names.index(user_field)), user_field, path)
            i = _arrow_ids(table.column(names.index(item_field)), item_field, path)
            t = (np.arange(table.num_rows, dtype=np.float64) if time_field is None
                 else _arrow_time(table.column(names.index(time_field))))
            if u is not None and i is not None and t is not None:
                got = (u, i, t)
    if got is None:                       # csv module: also the precise error path
        cols, rows, first = _read_table(path, "\t", True, None)
        names = [c.split(":", 1)[0] for c in cols]
        wanted = {"user": user_field, "item": item_field}
        if time_field is not None:
            wanted["time"] = time_field
        vals = _columns(path, names, rows, first, wanted)
        got = (_to_ids(vals["user"], user_field, path, first),
               _to_ids(vals["item"], item_field, path, first),
               _to_float(vals["time"], time_field, path, first) if time_field is not None
               else np.arange(len(rows), dtype=np.float64))
    (user, user_tokens), (item, item_tokens), time = got
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
