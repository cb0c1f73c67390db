"""What the container layouts (``webdataset``, ``parquet``) share: finding their files and splits,
reading a class value, and the layout shape built on one index per split.

**Splits.** Below ``data.root``, a file belongs to split S when it sits in a folder ``S/`` directly
below the root (``train/000001.tar``) or its file name starts with ``S-``, ``S_`` or ``S.``
(``train-00000-of-00004.parquet``, as Hugging Face datasets name theirs). The split names are the
configured ``data.train_split`` and ``data.eval_splits``. When no file belongs to any split, every
file is the one split ``all``; when some do, the others are ignored (and counted).

**Names.** A file's name is its path below its split folder (or the root), without its suffix:
``000001`` for ``train/000001.tar``, ``data/train-00000-of-00004`` for a Hugging Face table. Ids
are built from it (docs/architecture.md, "Data").
"""

from __future__ import annotations

import posixpath
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pdso_ray.data.listing import SplitInfo, SplitListing
from pdso_ray.storage import Storage, is_hidden

ALL = "all"  # the one split of data without splits


@dataclass(frozen=True)
class SourceFile:
    """One container file: its URL, size, split and name (module docstring), and ``version``, what
    changes when it is replaced (size and modification stamp; the images it holds carry it)."""

    url: str
    size: int
    split: str
    name: str
    version: str = ""


# A container's index written beside it (make-shards does): ``.<file name>`` + this, hidden.
INDEX_SUFFIX = ".idx.parquet"
# make-shards' plan at the top of its output: ours, so not counted as a stray file.
PLAN_FILE = ".make-shards.json"


@dataclass
class Sources:
    """The container files under a root, by split (each list sorted by name), the files that are
    neither containers nor in a split (``ignored``: URLs), and the containers' index files found
    beside them (``indexes``: container URL → index URL; see :func:`index_url`)."""

    splits: dict[str, list[SourceFile]] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    indexes: dict[str, str] = field(default_factory=dict)


def index_url(url: str) -> str:
    """Where a container's index sits: ``<folder>/.<name><INDEX_SUFFIX>``."""
    folder, _, name = url.rpartition("/")
    return f"{folder}/.{name}{INDEX_SUFFIX}" if folder else f".{name}{INDEX_SUFFIX}"


def find_sources(storage: Storage, root: str, suffix: str, split_names: Sequence[str]) -> Sources:
    """The files ending in ``suffix`` (case-insensitive) under ``root`` (a folder, or one file),
    sorted into splits by the rules of the module docstring. Hidden names are ignored.
    Raises FileNotFoundError when ``root`` does not exist."""
    if not storage.exists(root):
        raise FileNotFoundError(f"data root not found: {root}")
    if not storage.isdir(root):
        if not root.lower().endswith(suffix):
            raise FileNotFoundError(f"{root} is neither a folder nor a {suffix} file")
        name = posixpath.basename(root)[: -len(suffix)]
        size = storage.size(root)
        return Sources({ALL: [SourceFile(root, size, ALL, name, f"{size}:")]})
    _, base = storage.fs(root)
    base = base.rstrip("/") + "/"
    by_prefix = re.compile(r"^(%s)[-_.]" % "|".join(re.escape(s) for s in split_names)) if split_names else None
    found: list[tuple[str | None, SourceFile]] = []
    ignored: list[str] = []
    indexes: dict[str, str] = {}
    for entry in storage.list_entries(root):
        rel = storage.fs(entry.url)[1][len(base):]
        parts = rel.split("/")
        if parts[-1].startswith(".") and parts[-1].endswith(suffix + INDEX_SUFFIX):
            folder = entry.url[: len(entry.url) - len(parts[-1])]
            indexes[folder + parts[-1][1: -len(INDEX_SUFFIX)]] = entry.url
            continue
        if rel == PLAN_FILE:
            continue
        if any(is_hidden(p) for p in parts) or not rel.lower().endswith(suffix) or not entry.regular:
            ignored.append(entry.url)
            continue
        stem = rel[: -len(suffix)]
        if len(parts) > 1 and parts[0] in split_names:
            split, name = parts[0], stem.split("/", 1)[1]
        elif by_prefix is not None and (m := by_prefix.match(parts[-1])):
            split, name = m.group(1), stem
        else:
            split, name = None, stem
        found.append((split, SourceFile(entry.url, entry.size, split or ALL, name, f"{entry.size}:{entry.version}")))
    sources = Sources(ignored=ignored, indexes=indexes)
    if any(split is not None for split, _ in found):
        for split, source in found:
            if split is None:
                sources.ignored.append(source.url)
            else:
                sources.splits.setdefault(split, []).append(source)
    elif found:
        sources.splits[ALL] = [source for _, source in found]
    for files in sources.splits.values():
        files.sort(key=lambda f: f.name)
    return sources


def class_value(value: Any) -> str:
    """A sample's class as text: an integer (``3``, ``b"003\\n"``) becomes its decimal form, a name
    is kept stripped; None or empty is "" (no class)."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    text = str(value).strip()
    if re.fullmatch(r"[+-]?\d+", text):
        return str(int(text))
    return text


@dataclass
class SplitIndex:
    """One split of a container layout, listed: the images and what was rejected or ignored
    (``listing``), the ground-truth PNGs of its images (``gt``: relative name ``<rel>.png`` → URL)
    and how many of its images have none (``without_gt``)."""

    listing: SplitListing
    gt: dict[str, str] = field(default_factory=dict)
    without_gt: int = 0


@dataclass(frozen=True)
class ContainerLayout:
    """The layout shape (see :mod:`pdso_ray.data.layouts`) of data held in container files: one
    :class:`SplitIndex` per split, built by :meth:`index_split` (subclasses) and kept for the life
    of the object, since building one reads every container's index.

    ``root``: ``data.root``; ``sources``: its files by split (:func:`find_sources`), found when
    the layout is built; ``train``/``evaluation``: the configured split names, used when the data
    has splits; ``folder_is_class``: score the clustering against the samples' classes (the
    per-run diagnostics; samples without a class are left out of them).
    """

    root: str
    sources: Sources
    train: str
    evaluation: tuple[str, ...]
    max_file_bytes: int
    folder_is_class: bool = True
    _memo: dict[str, SplitIndex] = field(default_factory=dict, compare=False, repr=False)
    _lock: Any = field(default_factory=threading.Lock, compare=False, repr=False)

    name = "container"
    what = "container"  # "shard", "table": in messages

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_memo", "_lock")}

    def __setstate__(self, state):
        self.__dict__.update(state, _memo={}, _lock=threading.Lock())

    @property
    def has_splits(self) -> bool:
        return ALL not in self.sources.splits

    def train_split(self) -> str:
        return self.train if self.has_splits else ALL

    def split_url(self, split: str) -> str:
        """Where the split's files are (the root itself when they are told apart by name)."""
        folder = Storage.join(self.root, split)
        files = self.sources.splits.get(split, [])
        return folder if not files or files[0].url.startswith(folder + "/") else self.root

    def index(self, storage: Storage, split: str) -> SplitIndex:
        """The split's index, built on first use. Raises FileNotFoundError for a split the data
        does not have."""
        with self._lock:
            if split not in self._memo:
                if split not in self.sources.splits:
                    have = ", ".join(sorted(self.sources.splits)) or f"no {self.what} files"
                    raise FileNotFoundError(f"no {split} split under {self.root} (found: {have})")
                self._memo[split] = self.index_split(storage, split)
            return self._memo[split]

    def index_split(self, storage: Storage, split: str) -> SplitIndex:
        raise NotImplementedError

    def count_images(self, storage: Storage, split: str, enough: int) -> int:
        """Images of ``split``, counted no further than ``enough`` (the preflight's quick check):
        its files are listed one by one until they hold that many (the split's index, when it is
        built already)."""
        if split not in self.sources.splits:
            return 0
        if split in self._memo:
            return len(self._memo[split].listing.images)
        found = 0
        for source in self.sources.splits[split]:
            found += self.count_in(storage, source, split)
            if found >= enough:
                break
        return found

    def count_in(self, storage: Storage, source: SourceFile, split: str) -> int:
        """How many images of ``split`` the file ``source`` holds (duplicates across files
        included)."""
        raise NotImplementedError

    def list_split(self, storage: Storage, split: str) -> SplitListing:
        return self.index(storage, split).listing

    def split_info(self, storage: Storage, split: str) -> SplitInfo:
        if split not in self.sources.splits:
            return SplitInfo(split, False, None, f"no {split} split (no {self.what} of it under {self.root}): skipped")
        found = self.index(storage, split)
        if not found.listing.total:
            return SplitInfo(split, False, None, f"no {split} images under {self.root}: skipped")
        if not found.gt:
            return SplitInfo(split, True, None, f"{split} has no ground truth (no {self.gt_what} in its "
                                                f"{self.what}s): predicted, not evaluated")
        note = (f"{found.without_gt} {split} images have no {self.gt_what}: predicted, not evaluated"
                if found.without_gt else "")
        return SplitInfo(split, True, found.gt, note)

    gt_what = "ground truth"

    def eval_splits(self, storage: Storage) -> list[SplitInfo]:
        """The configured evaluation splits when the data has splits, else ``all``."""
        return [self.split_info(storage, s) for s in (self.evaluation if self.has_splits else (ALL,))]

    def source_name(self, image_id: str) -> str:
        """The image's name below its split (tables: the id or path it was given)."""
        return image_id.split("/", 1)[1]

    def gt_dir(self, storage: Storage, split: str) -> Mapping[str, str] | None:
        """The split's ground truth as ``{<rel>.png: URL}``, None when it has none."""
        if split not in self.sources.splits:
            return None
        return self.index(storage, split).gt or None


def index_files(files: Sequence[SourceFile], index_one: Callable[[SourceFile], Any], workers: int = 16) -> list:
    """``index_one`` of every file, in order, ``workers`` at a time (reading indexes is I/O)."""
    from concurrent.futures import ThreadPoolExecutor

    if len(files) <= 1:
        return [index_one(f) for f in files]
    with ThreadPoolExecutor(max_workers=min(workers, len(files))) as pool:
        return list(pool.map(index_one, files))
