"""Reading input bytes by URL, whatever holds them: a file, a byte range of a tar shard, a cell of a
Parquet table (:func:`read_many`, :func:`read_one`).

A batch of URLs is read in as few requests as the containers allow: the ranges of one shard
together (:meth:`pdso_ray.storage.Storage.read_ranges`), the cells of one row group together
(:func:`pdso_ray.data.image_tables.read_cells`), files one by one.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from pdso_ray.data.image_tables import parse_cell_url, read_cells
from pdso_ray.storage import ShortRead, Storage, UnreadableFile, parse_range_url

# data.max_file_bytes' default: the bound where a caller has no config
DEFAULT_MAX_BYTES = 256 * 1024 * 1024


def read_many(storage: Storage, urls: Sequence[str], max_bytes: int = DEFAULT_MAX_BYTES,
              root: str | None = None) -> list[bytes | Exception]:
    """The bytes at each URL, in order, read with the bounds of
    :meth:`~pdso_ray.storage.Storage.read_image_bytes` (``max_bytes``; local files inside
    ``root``). Where one cannot be read as input, its place holds the exception
    (:class:`~pdso_ray.storage.UnreadableFile` or FileNotFoundError, the message is the reason);
    any other storage failure raises (it names the URL)."""
    out: list[bytes | Exception] = [b""] * len(urls)
    ranges: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
    cells: list[int] = []
    for k, url in enumerate(urls):
        parsed = parse_range_url(url)
        if parsed is not None and parsed[2] - parsed[1] <= max_bytes:
            ranges[parsed[0]].append((k, parsed[1], parsed[2]))
        elif parse_cell_url(url) is not None:
            cells.append(k)
        else:
            out[k] = _read_file(storage, url, max_bytes, root)
    for container, members in ranges.items():
        for (k, _, _), value in zip(members, _read_ranges(storage, container, [(s, e) for _, s, e in members])):
            out[k] = value
    if cells:
        for k, value in zip(cells, read_cells(storage, [urls[k] for k in cells], max_bytes, root)):
            out[k] = value
    return out


def read_one(storage: Storage, url: str, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The bytes at ``url`` (see :func:`read_many`); raises what :func:`read_many` would hold."""
    (value,) = read_many(storage, [url], max_bytes)
    if isinstance(value, Exception):
        raise value
    return value


def _read_ranges(storage: Storage, url: str, spans: list[tuple[int, int]]) -> list[bytes | Exception]:
    """:meth:`~pdso_ray.storage.Storage.read_ranges`, with a shard that is gone or shorter than
    its index a per-member FileNotFoundError (it changed since it was listed) rather than a
    failed job."""
    try:
        return list(storage.read_ranges(url, spans))
    except FileNotFoundError as e:
        return [e] * len(spans)
    except ShortRead:
        if len(spans) == 1:
            return [FileNotFoundError(f"{url} is shorter than when it was listed")]
        return [value for span in spans for value in _read_ranges(storage, url, [span])]


def _read_file(storage: Storage, url: str, max_bytes: int, root: str | None) -> bytes | Exception:
    try:
        return storage.read_image_bytes(url, max_bytes, root=root)
    except (FileNotFoundError, UnreadableFile) as e:
        return e
