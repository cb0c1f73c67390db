"""Where a k-means shard's rows come from: a source is a small picklable description that
``load()``s an n x d float32 array, in the shard actor itself, so a restarted actor reloads the
same rows. Inputs (arrays, Parquet URLs, Ray Datasets) are classified and split into one source
per shard here."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

from pdso_ray.storage import Storage


def column_to_array(column: Any, name: str = "column") -> np.ndarray:
    """An Arrow list / fixed-size-list / tensor column of equal-length float rows -> n x d float32."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if isinstance(column.type, pa.ExtensionType):  # Ray Data's tensor columns
        column = column.storage
    kind = column.type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)):
        raise ValueError(f"column {name!r} must hold lists of floats (one vector per row), got {kind}")
    if column.null_count:
        raise ValueError(f"column {name!r} has {column.null_count} null rows")
    n = len(column)
    if n == 0:
        d = kind.list_size if pa.types.is_fixed_size_list(kind) else 0
        return np.zeros((0, d), dtype=np.float32)
    lengths = pc.list_value_length(column)
    lo, hi = pc.min(lengths).as_py(), pc.max(lengths).as_py()
    if lo != hi:
        raise ValueError(f"column {name!r} has vectors of different lengths ({lo}..{hi})")
    values = column.flatten().to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(values, dtype=np.float32).reshape(n, hi)


@dataclass(frozen=True)
class ArraySource:
    """Rows held in memory (in-process) or in Ray's object store (``ref``)."""

    array: np.ndarray | None = None
    ref: Any = None

    def load(self) -> np.ndarray:
        return self.array if self.array is not None else ray.get(self.ref)


@dataclass(frozen=True)
class ParquetSource:
    """Rows of ``column`` in the given Parquet files, concatenated in order.

    Loaded row group by row group into one preallocated array, so a shard's peak memory is its
    rows plus one row group (reading whole files and concatenating peaked at 3.6x the rows)."""

    urls: tuple[str, ...]
    column: str
    storage: Storage

    def _files(self) -> Iterator[tuple[str, Any]]:
        import pyarrow.parquet as pq

        for url in self.urls:
            fs, path = self.storage.arrow_fs(url)
            with fs.open_input_file(path) as f:
                yield url, pq.ParquetFile(f)

    def load(self) -> np.ndarray:
        # Two passes, footers then rows: one file open at a time (a shard may hold thousands of
        # files) for the price of reading each footer twice.
        total = sum(pf.metadata.num_rows for _, pf in self._files())
        out: np.ndarray | None = None
        start = 0
        for url, pf in self._files():
            for group in range(pf.num_row_groups):
                rows = column_to_array(pf.read_row_group(group, columns=[self.column]).column(self.column),
                                       f"{self.column} in {url}")
                if not len(rows):
                    continue
                if out is None:
                    out = np.empty((total, rows.shape[1]), dtype=np.float32)
                elif rows.shape[1] != out.shape[1]:
                    raise ValueError(f"{self.column} in {url} has {rows.shape[1]}-dimensional vectors, "
                                     f"earlier files {out.shape[1]}")
                out[start:start + len(rows)] = rows
                start += len(rows)
        if start != total:
            raise ValueError(f"{total} rows in the Parquet footers of {self.urls[0]}..., {start} read")
        return out if out is not None else np.zeros((0, 0), dtype=np.float32)


@dataclass(frozen=True)
class ArrowRefsSource:
    """Rows of ``column`` in Ray Data blocks (object references to Arrow tables), in order."""

    refs: tuple[Any, ...]
    column: str

    def load(self) -> np.ndarray:
        tables = ray.get(list(self.refs))
        return _concat([column_to_array(t.column(self.column), self.column) for t in tables])


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    parts = [p for p in parts if p.shape[0]] or parts[:1]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def describe(x: Any) -> str:
    if isinstance(x, np.ndarray):
        return f"array of shape {x.shape} and dtype {x.dtype}"
    return type(x).__name__


def classify_input(x: Any, column: str, storage: Storage) -> tuple[str, Any]:
    if isinstance(x, np.ndarray):
        if x.ndim != 2 or x.dtype != np.float32:
            raise ValueError(f"x must be an n x d float32 array (use x.astype(np.float32)), got {describe(x)}")
        return "array", x
    if isinstance(x, str):
        urls = storage.list_files(x, suffixes=(".parquet",)) if storage.isdir(x) else [x]
        if not urls:
            raise ValueError(f"no .parquet files under {x}")
        return "parquet", urls
    if isinstance(x, (list, tuple)):
        if not x or not all(isinstance(u, str) for u in x):
            raise ValueError(f"x as a list must hold Parquet URLs, got {x!r:.200}")
        return "parquet", list(x)
    import ray.data

    if isinstance(x, ray.data.Dataset):
        refs = x.select_columns([column]).to_arrow_refs()
        if not refs:
            raise ValueError("the Ray Dataset has no blocks")
        return "refs", refs
    raise ValueError(f"x must be a float32 array, Parquet URL(s), a Ray Dataset or KMeansShards, got {describe(x)}")


def whole_source(kind: str, payload: Any, column: str, storage: Storage) -> Any:
    if kind == "array":
        return ArraySource(array=payload)
    if kind == "parquet":
        return ParquetSource(tuple(payload), column, storage)
    return ArrowRefsSource(tuple(payload), column)


def split_sources(kind: str, payload: Any, num_shards: int, column: str, storage: Storage) -> tuple[list, list]:
    """One source per shard, contiguous in input order (so shard order = row order)."""
    if kind == "array":
        bounds = np.linspace(0, payload.shape[0], min(num_shards, max(1, payload.shape[0])) + 1).astype(int)
        refs = [ray.put(payload[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
        return [ArraySource(ref=r) for r in refs], refs
    groups = [list(g) for g in np.array_split(np.arange(len(payload)), min(num_shards, len(payload)))]
    if kind == "parquet":
        return [ParquetSource(tuple(payload[i] for i in g), column, storage) for g in groups], []
    return [ArrowRefsSource(tuple(payload[i] for i in g), column) for g in groups], list(payload)
