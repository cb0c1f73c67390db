"""Sets of label PNGs named by relative name (``<rel>.png``, the id below its split): loose files,
PNG shards, or a mapping — whatever a split's predictions, labels or ground truth are held in.

A **PNG source** is either a folder URL or a mapping ``{<rel>.png: URL}`` (the ground truth of a
container layout). :func:`png_files` turns either into the mapping. A folder may hold loose PNGs
(``output_format: files``) and **PNG shards** (``output_format: webdataset``): ``<name>.tar``
holding one member ``<rel>.png`` per image — WebDataset's convention, the image's key
``<rel>`` and the extension ``png`` — beside ``<name>.parquet``, its index and per-image
statistics (``id``, ``member``, ``offset``, ``size``, then the writer's own columns). The index is
written after the tar, so a shard counts only once it is whole; both are written atomically and
named by a hash of their ids (:func:`pdso_ray.tables.shard_name`), so a retried batch overwrites
its own shard. :func:`write_png_shard` writes one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

from pdso_ray.data.tar_shards import tar_bytes
from pdso_ray.data.ids import LABEL_SUFFIX, png_rel
from pdso_ray.storage import Storage, is_hidden, range_url
from pdso_ray.tables import read_table, shard_name, write_table

PngSource = str | Mapping[str, str]
OUTPUT_FORMATS = ("files", "webdataset")  # the choices of output_format
INDEX_COLUMNS = ("id", "member", "offset", "size")


def png_files(storage: Storage, source: PngSource) -> dict[str, str]:
    """``{<rel>.png: URL}`` of a PNG source (module docstring): a mapping as it is; for a folder,
    its loose PNGs (hidden names skipped) and the members of the shards whose index exists."""
    if not isinstance(source, str):
        return dict(source)
    _, base = storage.fs(source)
    base = base.rstrip("/") + "/"
    out: dict[str, str] = {}
    tars, indexes = set(), []
    for entry in storage.list_entries(source):
        rel = storage.fs(entry.url)[1][len(base):]
        if any(is_hidden(p) for p in rel.split("/")):
            continue
        if rel.endswith(LABEL_SUFFIX):
            out[rel] = entry.url
        elif rel.endswith(".tar"):
            tars.add(entry.url[: -len(".tar")])
        elif rel.endswith(".parquet") and entry.size:
            indexes.append(entry.url)
    for index in indexes:
        stem = index[: -len(".parquet")]
        if stem not in tars:
            continue
        rows = read_table(storage, index, columns=list(INDEX_COLUMNS))
        for image_id, member, offset, size in zip(*(rows.column(c).to_pylist() for c in INDEX_COLUMNS)):
            out[png_rel(image_id)] = range_url(stem + ".tar", offset, offset + size, member)
    return out


def write_png_shard(storage: Storage, folder: str, pngs: Sequence[tuple[str, bytes]],
                    columns: Mapping[str, pa.Array | Sequence[Any]] | None = None) -> list[str]:
    """Write one PNG shard and its index into ``folder`` (module docstring): ``pngs`` are
    ``(image id, PNG bytes)``, ``columns`` per-image statistics in the same order. Returns the
    range URL of each PNG, in order."""
    ids = [image_id for image_id, _ in pngs]
    stem = Storage.join(folder, shard_name(ids)[: -len(".parquet")])
    data, members = tar_bytes([(png_rel(image_id), png) for image_id, png in pngs])
    storage.write_bytes(stem + ".tar", data)
    table = {"id": pa.array(ids, pa.string()),
             "member": pa.array([m.name for m in members], pa.string()),
             "offset": pa.array([m.offset for m in members], pa.int64()),
             "size": pa.array([m.size for m in members], pa.int64())}
    for name, values in (columns or {}).items():
        table[name] = values if isinstance(values, pa.Array) else pa.array(list(values))
    write_table(storage, stem + ".parquet", pa.table(table))  # last: the shard is whole
    return [range_url(stem + ".tar", m.offset, m.end, m.name) for m in members]


class PngOutputs:
    """The per-image PNGs one batch writes (``output_format``): as files, each written when it is
    added; as shards, one PNG shard per folder, written by :meth:`flush` in the order the folders
    were first added to — so a writer that adds the PNG marking an image done last keeps that
    rule per shard."""

    def __init__(self, storage: Storage, output_format: str):
        if output_format not in OUTPUT_FORMATS:
            raise ValueError(f"output_format must be one of {OUTPUT_FORMATS}, got {output_format!r}")
        self.storage = storage
        self.as_shards = output_format == "webdataset"
        self.pending: dict[str, list[tuple[str, bytes]]] = {}
        self.urls: dict[tuple[str, str], str] = {}

    def add(self, folder: str, image_id: str, png: bytes) -> None:
        """``png`` of ``image_id`` into ``folder`` (its split's folder: the name inside is
        ``<rel>.png``)."""
        if self.as_shards:
            self.pending.setdefault(folder, []).append((image_id, png))
            return
        url = Storage.join(folder, png_rel(image_id))
        self.storage.write_bytes(url, png)
        self.urls[(folder, image_id)] = url

    def flush(self, stats: Mapping[str, Mapping[str, Any]] | None = None) -> dict[tuple[str, str], str]:
        """Write the pending shards, each with the ``stats`` of its images (``{id: {column:
        value}}``, the same columns for every id) as its index's extra columns. Returns the URL of
        every PNG added since the object was made, by ``(folder, image id)``."""
        for folder, pngs in self.pending.items():
            rows = [stats[i] for i, _ in pngs] if stats else []
            columns = {k: [row[k] for row in rows] for k in (rows[0] if rows else {})}
            for (image_id, _), url in zip(pngs, write_png_shard(self.storage, folder, pngs, columns)):
                self.urls[(folder, image_id)] = url
        self.pending = {}
        return dict(self.urls)
