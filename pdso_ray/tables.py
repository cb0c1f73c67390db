"""Parquet artifacts of the run folder: write one table atomically, read folders by row group.

Feature vectors are stored as ``list<float32>`` columns (DESIGN §6) and come back as N×D float32
matrices; readers stream row groups so no stage needs more than one shard in memory at a time.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pdso_ray.storage import Storage


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
    return storage.list_files(folder, suffixes=(".parquet",))


def iter_row_groups(storage: Storage, folder_or_files: str | Sequence[str],
                    columns: Sequence[str] | None = None) -> Iterator[pa.Table]:
    """Yield the folder's Parquet content one row group at a time, files in sorted order."""
    files = parquet_files(storage, folder_or_files) if isinstance(folder_or_files, str) else folder_or_files
    for url in files:
        with storage.open(url, "rb") as f:
            reader = pq.ParquetFile(f)
            for i in range(reader.num_row_groups):
                yield reader.read_row_group(i, columns=list(columns) if columns else None)


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
