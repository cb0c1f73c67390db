"""``data.layout: parquet``: images in Parquet tables (docs/architecture.md, "Data").

``data.root`` holds ``*.parquet`` tables, in split folders or named by split
(:mod:`pdso_ray.data.sources`; Hugging Face's ``data/train-00000-of-00004.parquet`` works), or with
a ``split`` column, or without splits (the one split ``all``). Columns, each found by name:

- the image: ``image`` (or ``jpg``, ``jpeg``, ``png``, ``webp``, as img2dataset names it) holding
  the encoded bytes, or Hugging Face's image struct ``{bytes, path}``; or ``path``: a URL or a
  path relative to the table's folder. A row whose bytes are null falls back to its ``path``;
- ``id`` (or ``key``, ``__key__``): the image's id below its split, unique; without one the id is
  the ``path`` without its suffix (when it is relative), else ``<table name>/<row number, 8
  digits>`` — stable as long as the table is;
- ``cls`` (or ``label``): the class, an integer or a name (per-run diagnostics);
- ``seg``: the ground truth, PNG bytes in the ImageNet-S codec (or an image struct).

Every row is accounted for: a row whose id is unsafe or repeats one of its split, or that has no
image and no path, is rejected with a reason naming the table and the row; an unreadable table
is one rejection without an id. Images are read per row group (:func:`read_cells`): one request
for the column chunk of a group, shared by every row of a batch that falls in it, so tables with
row groups of a few hundred images read best (Hugging Face writes 100 images per group; a table
written as one huge group is read again for each batch that needs it).

Image locations are **cell URLs**, ``<table>#row=<row group>:<row in group>&column=<name>``
(:func:`cell_url`), which :func:`read_cells` reads back.
"""

from __future__ import annotations

import posixpath
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pdso_ray.data.listing import ImageRecord, Rejected, SplitListing
from pdso_ray.data.sources import ContainerLayout, SourceFile, SplitIndex, class_value, index_files
from pdso_ray.data.ids import image_id, png_rel, unsafe_reason
from pdso_ray.storage import Storage, UnreadableFile

TABLE_SUFFIX = ".parquet"
IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp")
ID_COLUMNS = ("id", "key", "__key__")
CLASS_COLUMNS = ("cls", "label")
GT_COLUMN = "seg"
PATH_COLUMN = "path"
SPLIT_COLUMN = "split"
_CELL = re.compile(r"#row=(\d+):(\d+)&column=([^#&]+)$")


def cell_url(table_url: str, row_group: int, row: int, column: str) -> str:
    """The URL of one cell: ``column`` of row ``row`` of row group ``row_group``."""
    return f"{table_url}#row={row_group}:{row}&column={column}"


def parse_cell_url(url: str) -> tuple[str, int, int, str] | None:
    """``(table URL, row group, row, column)`` of a :func:`cell_url`, None for another URL."""
    m = _CELL.search(url)
    return None if m is None else (url[: m.start()], int(m.group(1)), int(m.group(2)), m.group(3))


@dataclass(frozen=True)
class TableColumns:
    """Which columns of a table play which part (module docstring); None where it has none."""

    image: str | None
    path: str | None
    id: str | None
    cls: str | None
    seg: str | None
    split: str | None

    @classmethod
    def of(cls, schema: pa.Schema) -> TableColumns:
        names = set(schema.names)

        def first(options, usable=lambda t: True):
            return next((n for n in options if n in names and usable(schema.field(n).type)), None)

        image = first(IMAGE_COLUMNS, _holds_bytes)
        path = PATH_COLUMN if PATH_COLUMN in names else first(IMAGE_COLUMNS, _holds_text)
        return cls(image=image, path=path, id=first(ID_COLUMNS), cls=first(CLASS_COLUMNS),
                   seg=GT_COLUMN if GT_COLUMN in names and _holds_bytes(schema.field(GT_COLUMN).type) else None,
                   split=SPLIT_COLUMN if SPLIT_COLUMN in names else None)


def _holds_bytes(t: pa.DataType) -> bool:
    return (pa.types.is_binary(t) or pa.types.is_large_binary(t)
            or (pa.types.is_struct(t) and t.get_field_index("bytes") >= 0))


def _holds_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


@dataclass
class TableRows:
    """What :func:`list_table` found, by split: images, rejections, ground truth, and the images
    without ground truth in a table that has some."""

    images: dict[str, list[ImageRecord]] = field(default_factory=lambda: defaultdict(list))
    rejected: dict[str, list[Rejected]] = field(default_factory=lambda: defaultdict(list))
    gt: dict[str, dict[str, str]] = field(default_factory=lambda: defaultdict(dict))
    without_gt: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    ignored: list[str] = field(default_factory=list)  # rows of a split no one asked for


def resolve_path(table_url: str, path: str) -> str | None:
    """A ``path`` cell as a URL: URLs and absolute paths as they are, a relative path below the
    table's folder; None when a relative path climbs out of it (``..``)."""
    if "://" in path or path.startswith("/"):
        return path
    if any(part == ".." for part in path.split("/")):
        return None
    return Storage.join(posixpath.dirname(table_url), path)


def list_table(storage: Storage, source: SourceFile, splits: Sequence[str]) -> TableRows:
    """The rows of one table, by split (``splits``: the split names a ``split`` column may hold;
    rows of other values are ignored)."""
    out = TableRows()
    try:
        with storage.open(source.url, "rb") as f:
            table = pq.ParquetFile(f)
            columns = TableColumns.of(table.schema_arrow)
            groups = [table.metadata.row_group(g).num_rows for g in range(table.metadata.num_row_groups)]
            wanted = [c for c in (columns.id, columns.path, columns.cls, columns.split) if c]
            values = table.read(columns=wanted) if wanted else pa.table({})
            seg_nulls = _null_rows(table, columns.seg) if columns.seg else None
    except (OSError, ValueError, pa.ArrowException) as e:
        out.rejected[source.split].append(Rejected(path=source.url, reason=f"unreadable table {source.url}: {e}"))
        return out

    def column(name):
        return values.column(name).to_pylist() if name else [None] * sum(groups)

    ids, paths, classes, split_values = (column(c) for c in (columns.id, columns.path, columns.cls, columns.split))
    row = 0
    for g, rows in enumerate(groups):
        for i in range(rows):
            split = str(split_values[row]) if columns.split else source.split
            image = cell_url(source.url, g, i, columns.image) if columns.image else None
            if columns.split and split not in splits:
                out.ignored.append(image or f"{source.url}#row={g}:{i}")
            else:
                _add_row(out, source, split, f"table {source.url}, row {row}", row, ids[row], paths[row],
                         classes[row], image=image,
                         seg=cell_url(source.url, g, i, columns.seg) if columns.seg and not seg_nulls[row] else None,
                         has_seg=columns.seg is not None)
            row += 1
    return out


def _null_rows(table: pq.ParquetFile, column: str) -> list[bool]:
    """Per row, whether ``column`` is null: from the row groups' statistics when they say all or
    none (no data read), else from the column itself."""
    out: list[bool] = []
    meta = table.metadata
    index = table.schema_arrow.names.index(column)
    for g in range(meta.num_row_groups):
        rows = meta.row_group(g).num_rows
        leaf = _first_leaf(meta, g, column)
        stats = meta.row_group(g).column(leaf).statistics if leaf is not None else None
        if stats is not None and stats.has_null_count and stats.null_count in (0, rows):
            out += [stats.null_count == rows] * rows
        else:
            col = table.read_row_group(g, columns=[table.schema_arrow.names[index]]).column(0)
            if pa.types.is_struct(col.type):
                col = col.combine_chunks().field("bytes")
            out += [v is None for v in col.to_pylist()]
    return out


def _first_leaf(meta, g: int, column: str) -> int | None:
    """The index of the leaf column holding ``column``'s bytes (the column itself, or its
    ``bytes`` field), None when the file's schema does not say."""
    group = meta.row_group(g)
    for j in range(group.num_columns):
        path = group.column(j).path_in_schema
        if path in (column, f"{column}.bytes"):
            return j
    return None


def _add_row(out: TableRows, source: SourceFile, split: str, where: str, row: int, given_id: Any,
             path: Any, cls: Any, image: str | None, seg: str | None, has_seg: bool) -> None:
    if given_id is not None and str(given_id) != "":
        rel = str(given_id)
    elif isinstance(path, str) and "://" not in path and not path.startswith("/") and "." in posixpath.basename(path):
        rel = path[: path.rfind(".")]
    else:
        rel = f"{source.name}/{row:08d}"
    problem = unsafe_reason(rel)
    candidate = image_id(split, rel) if problem is None else None
    url = image
    if url is None:
        resolved = resolve_path(source.url, path) if isinstance(path, str) and path else None
        url = resolved or source.url
        if problem is None and not path:
            problem = "no image bytes and no path"
        elif problem is None and resolved is None:
            problem = f"path {path!r} climbs out of the table's folder"
    if problem is not None:
        out.rejected[split].append(Rejected(path=url, reason=f"{problem} ({where})", image_id=candidate, rel=rel))
        return
    # an image held in the table changes with it; one it names by path is not stamped here
    out.images[split].append(ImageRecord(id=candidate, path=url, split=split, wnid=class_value(cls),
                                         version=source.version if image is not None else ""))
    if seg is not None:
        out.gt[split][png_rel(candidate)] = seg
    elif has_seg:
        out.without_gt[split] += 1


@dataclass(frozen=True)
class ParquetLayout(ContainerLayout):
    """Parquet image tables (module docstring). ``split_column``: rows carry their split in a
    ``split`` column (then every table is read for every split)."""

    split_column: bool = False

    name = "parquet"
    what = "table"
    gt_what = "seg value"

    @property
    def has_splits(self) -> bool:
        return self.split_column or super().has_splits

    def count_in(self, storage: Storage, source: SourceFile, split: str) -> int:
        return len(list_table(storage, source, (self.train, *self.evaluation)).images.get(split, []))

    def index_split(self, storage: Storage, split: str) -> SplitIndex:
        names = (self.train, *self.evaluation)
        tables = index_files(self.sources.splits[split], lambda source: list_table(storage, source, names))
        listing = SplitListing(split=split)
        found = SplitIndex(listing)
        taken: dict[str, str] = {}
        for rows in tables:
            for rejected in rows.rejected.get(split, []):
                listing.rejected.append(rejected)
            for record in rows.images.get(split, []):
                if record.id in taken:
                    listing.rejected.append(Rejected(path=record.path, reason=f"duplicate id {record.id!r} "
                                                     f"(also {taken[record.id]})", rel=record.id.split("/", 1)[1]))
                    continue
                taken[record.id] = record.path
                listing.images.append(record)
            found.gt.update(rows.gt.get(split, {}))
            found.without_gt += rows.without_gt.get(split, 0)
            if split == self.train_split():
                listing.ignored += rows.ignored
        if split == self.train_split():
            listing.ignored += self.sources.ignored
        return found


def read_cells(storage: Storage, urls: Sequence[str], max_bytes: int, root: str | None = None
               ) -> list[bytes | Exception]:
    """The bytes each cell URL names, in order; a cell that holds no usable image gives an
    exception instead (:class:`~pdso_ray.storage.UnreadableFile` with the reason, or
    FileNotFoundError). Each (table, row group) is read once, only the columns asked plus
    ``path`` (the fallback of a null image)."""
    out: list[bytes | Exception] = [UnreadableFile("unread")] * len(urls)
    groups: dict[tuple[str, int], list[tuple[int, int, str]]] = defaultdict(list)
    for k, url in enumerate(urls):
        parsed = parse_cell_url(url)
        if parsed is None:
            raise ValueError(f"not a cell URL: {url}")
        table_url, g, i, column = parsed
        groups[(table_url, g)].append((k, i, column))
    for (table_url, g), cells in groups.items():
        with storage.open(table_url, "rb") as f:
            table = pq.ParquetFile(f)
            names = table.schema_arrow.names
            wanted = sorted({c for _, _, c in cells} | ({PATH_COLUMN} & set(names)))
            missing = [c for c in wanted if c not in names]
            if missing or g >= table.metadata.num_row_groups:
                raise FileNotFoundError(f"{table_url} has no column {missing} or row group {g}: "
                                        "it changed since it was listed")
            data = table.read_row_group(g, columns=wanted)
        for k, i, column in cells:
            where = f"table {table_url}, row group {g}, row {i}"
            try:
                value = data.column(column)[i].as_py()
                path = data.column(PATH_COLUMN)[i].as_py() if PATH_COLUMN in wanted else None
            except IndexError:
                out[k] = FileNotFoundError(f"{where}: no such row (the table changed since it was listed)")
                continue
            out[k] = _cell_bytes(storage, table_url, value, path, where, max_bytes, root)
    return out


def _cell_bytes(storage: Storage, table_url: str, value: Any, path: Any, where: str, max_bytes: int,
                root: str | None) -> bytes | Exception:
    if isinstance(value, dict):  # Hugging Face's image struct
        value, path = value.get("bytes"), value.get("path") or path
    if isinstance(value, (bytes, bytearray)):
        if len(value) > max_bytes:
            return UnreadableFile(f"image of {len(value)} bytes, larger than {max_bytes} (data.max_file_bytes) ({where})")
        return bytes(value)
    url = resolve_path(table_url, path) if isinstance(path, str) and path else None
    if url is None:
        return UnreadableFile(f"no image bytes and no usable path ({where})")
    try:
        return storage.read_image_bytes(url, max_bytes, root=root)
    except (FileNotFoundError, UnreadableFile) as e:
        return type(e)(f"{e} ({where}, path {path!r})")
