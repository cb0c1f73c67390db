"""Artifacts of the run folder: Parquet tables written atomically and read row group by row
group, files aligned row by row with the feature files, and ``.npy`` arrays.

Feature vectors are stored as ``list<float32>`` columns (docs/architecture.md, "Contracts") and
come back as N×D float32 matrices; readers stream row groups so no stage needs more than one shard
in memory at a time. Readers skip hidden names (temporary files of an interrupted write) and
zero-byte files (a write that never completed), so a leftover never changes a result.
"""

from __future__ import annotations

import hashlib
import io
import logging
import posixpath
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pdso_ray.storage import Storage, is_hidden

log = logging.getLogger("pdso_ray")


def vectors_to_arrow(matrix: np.ndarray, value_type: pa.DataType = pa.float32()) -> pa.Array:
    """N×D matrix → ``list<value_type>`` array (no per-row Python objects)."""
    matrix = np.ascontiguousarray(matrix, dtype=value_type.to_pandas_dtype())
    n, d = matrix.shape
    offsets = pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(matrix.reshape(-1), value_type))


def arrow_to_vectors(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """``list<float32>`` column of equal-length rows → N×D float32 matrix."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    n = len(column)
    if n == 0:
        return np.zeros((0, 0), dtype=np.float32)
    flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    if flat.size % n:
        raise ValueError(f"ragged vector column: {flat.size} values for {n} rows")
    return flat.reshape(n, flat.size // n)


def shard_name(ids: Sequence[str]) -> str:
    """File name of the shard holding exactly these ids: a retried batch overwrites its own file."""
    return "part-" + hashlib.sha1("\n".join(ids).encode()).hexdigest()[:20] + ".parquet"


def write_table(storage: Storage, url: str, table: pa.Table, row_group_size: int = 65_536) -> None:
    """Write ``table`` as one Parquet file at ``url`` (atomically, via the storage seam)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size, compression="zstd")
    storage.write_bytes(url, buf.getvalue())


def read_table(storage: Storage, url: str, columns: Sequence[str] | None = None) -> pa.Table:
    with storage.open(url, "rb") as f:
        return pq.read_table(f, columns=list(columns) if columns else None)


def parquet_files(storage: Storage, folder: str) -> list[str]:
    """The Parquet files under ``folder``, sorted; hidden (temporary) and empty files are left out."""
    out = []
    for entry in storage.list_entries(folder):
        name = posixpath.basename(entry.url)
        if not name.lower().endswith(".parquet") or is_hidden(name):
            continue
        if entry.size == 0:
            log.warning("skipping the empty file %s (an interrupted write)", entry.url)
            continue
        out.append(entry.url)
    return out


def iter_row_groups(storage: Storage, folder_or_files: str | Sequence[str],
                    columns: Sequence[str] | None = None) -> Iterator[pa.Table]:
    """Yield the folder's Parquet content one row group at a time, files in sorted order."""
    files = parquet_files(storage, folder_or_files) if isinstance(folder_or_files, str) else folder_or_files
    for url in files:
        with storage.open(url, "rb") as f:
            reader = pq.ParquetFile(f)
            for i in range(reader.num_row_groups):
                yield reader.read_row_group(i, columns=list(columns) if columns else None)


def drop_ids(storage: Storage, folder: str, ids: set[str]) -> int:
    """Rewrite the Parquet files of ``folder`` without the rows whose ``id`` is in ``ids`` (a
    file left empty is removed; files without such rows are not touched). Returns the rows
    dropped."""
    dropped = 0
    for url in parquet_files(storage, folder):
        table = read_table(storage, url)
        keep = pc.invert(pc.is_in(table.column("id"), value_set=pa.array(sorted(ids), pa.string())))
        keep = pc.fill_null(keep, True)  # rows without an id (a refused file's) stay
        kept = int(pc.sum(keep).as_py() or 0)
        if kept == table.num_rows:
            continue
        dropped += table.num_rows - kept
        if kept:
            write_table(storage, url, table.filter(keep))
        else:
            storage.remove(url)
    return dropped


def read_folder(storage: Storage, folder: str, columns: Sequence[str] | None = None) -> pa.Table | None:
    """The whole folder as one table (small artifacts only); None when it holds no Parquet."""
    tables = list(iter_row_groups(storage, folder, columns))
    return pa.concat_tables(tables) if tables else None


def count_rows(storage: Storage, folder: str) -> int:
    total = 0
    for url in parquet_files(storage, folder):
        with storage.open(url, "rb") as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total


def row_group_sizes(storage: Storage, files: Sequence[str]) -> list[list[int]]:
    """Rows of every row group of every file (Parquet footers only, no data), in file order."""
    sizes = []
    for url in files:
        with storage.open(url, "rb") as f:
            meta = pq.ParquetFile(f).metadata
        sizes.append([meta.row_group(i).num_rows for i in range(meta.num_row_groups)])
    return sizes


def write_aligned_files(storage: Storage, source_files: Sequence[str], out_dir: str,
                        make_columns: Callable[[int, int, int], dict[str, np.ndarray | pa.Array]],
                        keep: Sequence[str] = ("id",)) -> int:
    """Write one Parquet file per source file, named like it, holding the source's ``keep``
    columns and then ``make_columns(file_index, start, stop)``: per-row values of that file's rows,
    whose global numbers (row order of ``source_files``) are ``start .. stop``. Only one file's
    rows are in memory at a time. Returns the number of rows written."""
    start = 0
    for i, url in enumerate(source_files):
        table = read_table(storage, url, columns=list(keep))
        stop = start + table.num_rows
        for name, values in make_columns(i, start, stop).items():
            if len(values) != table.num_rows:
                raise RuntimeError(f"{out_dir}: column {name!r} has {len(values)} values for the "
                                   f"{table.num_rows} rows of {url}")
            table = table.append_column(name, pa.array(values) if isinstance(values, np.ndarray) else values)
        write_table(storage, Storage.join(out_dir, url.rsplit("/", 1)[-1]), table)
        start = stop
    return start


def write_aligned(storage: Storage, source_files: Sequence[str], out_dir: str,
                  columns: dict[str, np.ndarray | pa.Array], keep: Sequence[str] = ("id",)) -> None:
    """:func:`write_aligned_files` for per-row arrays already in memory (in the row order of
    ``source_files``)."""
    def rows(_: int, start: int, stop: int) -> dict[str, np.ndarray | pa.Array]:
        return {name: values[start:stop] if isinstance(values, np.ndarray) else values.slice(start, stop - start)
                for name, values in columns.items()}

    total = write_aligned_files(storage, source_files, out_dir, rows, keep)
    lengths = {len(v) for v in columns.values()}
    if lengths != {total}:
        raise RuntimeError(f"{out_dir}: {total} source rows but {sorted(lengths)} values")


def save_array(storage: Storage, url: str, array: np.ndarray) -> None:
    """``array`` as ``.npy`` bytes at ``url`` (atomic write, no pickles)."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    storage.write_bytes(url, buf.getvalue())


def load_array(storage: Storage, url: str) -> np.ndarray:
    return np.load(io.BytesIO(storage.read_bytes(url)), allow_pickle=False)


def column_names(storage: Storage, folder: str) -> list[str]:
    """The columns of a Parquet folder (of its first file); none when it holds no Parquet."""
    files = parquet_files(storage, folder)
    if not files:
        return []
    with storage.open(files[0], "rb") as f:
        return pq.read_schema(f).names


def id_order(storage: Storage, files: Sequence[str]) -> np.ndarray:
    """The rows of ``files`` (in file order) sorted by their ``id``: an int64 permutation of the
    global row numbers. Where a stage draws random rows by position (k-means starts), drawing
    positions in this order picks the same images however the rows arrived in the files."""
    ids = pa.chunked_array([c for t in iter_row_groups(storage, list(files), ["id"]) for c in t.column("id").chunks],
                           pa.string())
    return pc.sort_indices(ids).to_numpy().astype(np.int64)


def column_values(storage: Storage, folder: str, column: str) -> np.ndarray | None:
    """One column of a Parquet folder as a numpy array (files in order); None when the folder
    holds no Parquet or its files lack the column."""
    if column not in column_names(storage, folder):
        return None
    files = parquet_files(storage, folder)
    parts = [t.column(column).to_numpy(zero_copy_only=False) for t in iter_row_groups(storage, files, [column])]
    return np.concatenate(parts) if parts else None
