"""The one storage seam: every file the pipeline reads or writes goes through :class:`Storage`.

URLs may be plain paths, ``file://``, ``s3://bucket/key`` or ``memory://``. S3 settings come from
the config (``storage.s3``) or from the usual AWS environment variables; credentials are kept in
the object only, never in what it returns as text.

A **range URL** names bytes ``[start, end)`` of a larger object — a member of a tar shard:
``<url>#bytes=<start>-<end>&member=<name, percent-quoted>`` (:func:`range_url`,
:func:`parse_range_url`). Every read accepts one and fetches only those bytes;
:meth:`Storage.read_ranges` fetches many ranges of one object in a few requests, merging
neighbours, which is what makes a shard cheaper to read than loose files.

Writes are atomic: data goes to a temporary name in the same folder, then is moved into place
(on S3 a single PUT is already atomic), so a retried task overwrites instead of leaving halves; a
failed write removes its temporary file. Readers of the run folder skip hidden names (``.*``, the
temporary names among them: :func:`is_hidden`).

Errors name the object: a read or write that fails after the filesystem's own retries raises
:class:`StorageError` (an ``OSError``) whose message starts with the operation and the URL, and
a missing file raises ``FileNotFoundError`` naming it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import posixpath
import re
import stat
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

import fsspec
from fsspec.core import url_to_fs

MANIFEST_NAME = "_SUCCESS.json"

# botocore retries transient S3 errors (throttling, 5xx, connection resets) with backoff; a run's
# budget comes from the config (storage.retries, storage.timeout_s: PipelineConfig.storage_options).
_S3_RETRY_CONFIG = {"retries": {"max_attempts": 5, "mode": "adaptive"}}


# Neighbouring ranges of one object are fetched in one request when the bytes between them are at
# most MERGE_GAP and the request at most MERGE_SPAN (members of a shard sit back to back, split by
# 512-byte headers and the sample's other members).
MERGE_GAP = 1 << 20
MERGE_SPAN = 64 << 20
_RANGE = re.compile(r"#bytes=(\d+)-(\d+)(?:&member=([^#&]*))?$")


def range_url(url: str, start: int, end: int, member: str | None = None) -> str:
    """The URL of bytes ``[start, end)`` of the object at ``url``; ``member`` (e.g. the tar
    member's name) is carried along so that messages can name it."""
    if not 0 <= start <= end:
        raise ValueError(f"bad byte range {start}-{end} of {url}")
    tail = f"&member={quote(member, safe='/')}" if member is not None else ""
    return f"{url}#bytes={start}-{end}{tail}"


def parse_range_url(url: str) -> tuple[str, int, int, str | None] | None:
    """``(object URL, start, end, member)`` of a :func:`range_url`, None for a plain URL."""
    m = _RANGE.search(url)
    if m is None:
        return None
    member = unquote(m.group(3)) if m.group(3) is not None else None
    return url[: m.start()], int(m.group(1)), int(m.group(2)), member


def merge_ranges(spans: Sequence[tuple[int, int]], gap: int = MERGE_GAP, span: int = MERGE_SPAN
                 ) -> list[tuple[int, int, list[int]]]:
    """Group byte ranges ``[(start, end)]`` of one object into requests ``(start, end, [indices of
    the ranges it covers])``: sorted by start, a range joins the previous request when it begins
    at most ``gap`` bytes after that request's end and the request stays within ``span`` bytes."""
    groups: list[tuple[int, int, list[int]]] = []
    for i in sorted(range(len(spans)), key=lambda k: spans[k]):
        start, end = spans[i]
        if groups and start - groups[-1][1] <= gap and max(end, groups[-1][1]) - groups[-1][0] <= span:
            first, last, members = groups[-1]
            groups[-1] = (first, max(last, end), members + [i])
        else:
            groups.append((start, end, [i]))
    return groups


def protocol(url: str) -> str:
    """``"s3"`` for ``s3://b/k``, ``"file"`` for plain paths."""
    if "://" in url:
        return url.split("://", 1)[0]
    return "file"



class StorageError(OSError):
    """A read, write or listing failed for good (after retries); the message names the URL."""


class ShortRead(StorageError):
    """A byte range reaches past the end of its object: the object changed since it was indexed."""


class UnreadableFile(ValueError):
    """A file that must not be read as an image: not a regular file, too large, or a symlink out of
    its data root. The message is the reason recorded for the image."""


def is_hidden(name: str) -> bool:
    """Hidden names (``.DS_Store``, ``._x.JPEG``, this module's ``.tmp-*`` writes) are never data."""
    return name.startswith(".")


@contextlib.contextmanager
def naming(operation: str, url: str) -> Iterator[None]:
    """Re-raise an ``OSError`` from the block as :class:`StorageError` naming ``operation`` and
    ``url`` (a missing file stays ``FileNotFoundError``, naming the URL)."""
    try:
        yield
    except (StorageError, UnreadableFile):
        raise
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {url}") from None
    except OSError as e:
        raise StorageError(f"{operation} {url} failed: {type(e).__name__}: {e}") from e
    except Exception as e:
        # botocore's connection errors are not OSErrors; they are storage failures all the same
        if type(e).__module__.split(".")[0] in ("botocore", "aiobotocore"):
            raise StorageError(f"{operation} {url} failed: {type(e).__name__}: {e}") from e
        raise


@dataclass(frozen=True)
class FileEntry:
    """One file found by :meth:`Storage.list_entries`.

    ``url``: its URL (same scheme as the listed folder); ``size``: bytes; ``regular``: a regular
    file (objects in an object store always are; on a local disk a symlink counts as regular when
    its target is one); ``link_target``: for a local symlink (or a file reached through a
    symlinked folder), the real path it resolves to, else None; ``folder_link``: the entry is a
    symlinked folder that was not listed into (its target is outside the folders it may be
    followed into, or listed already), ``link_target`` its target; ``version``: what changes when
    the file is replaced (its modification time, or an object store's ETag), "" when unknown.
    """

    url: str
    size: int
    regular: bool
    link_target: str | None = None
    folder_link: bool = False
    version: str = ""


class Storage:
    """Filesystem access by URL, with per-protocol options.

    ``options`` maps a protocol to fsspec keyword arguments, e.g.
    ``{"s3": {"endpoint_url": "http://127.0.0.1:5000", "key": "...", "secret": "..."}}``.
    The object is picklable (Ray workers rebuild the filesystems lazily).
    """

    def __init__(self, options: Mapping[str, Mapping[str, Any]] | None = None):
        self.options = {k: dict(v) for k, v in (options or {}).items()}
        self._cache: dict[str, fsspec.AbstractFileSystem] = {}

    def __getstate__(self):
        return {"options": self.options}

    def __setstate__(self, state):
        self.options = state["options"]
        self._cache = {}

    def __repr__(self) -> str:  # never print credentials
        return f"Storage(protocols={sorted(self.options)})"

    # ---- filesystems -------------------------------------------------------------------------
    def _fs_options(self, scheme: str) -> dict[str, Any]:
        opts = dict(self.options.get(scheme, {}))
        if scheme in ("s3", "s3a"):
            endpoint = opts.pop("endpoint_url", None) or os.environ.get("AWS_ENDPOINT_URL")
            client_kwargs = dict(opts.pop("client_kwargs", {}) or {})
            if endpoint:
                client_kwargs.setdefault("endpoint_url", endpoint)
            opts["client_kwargs"] = client_kwargs
            config_kwargs = dict(opts.pop("config_kwargs", {}) or {})
            config_kwargs.setdefault("retries", _S3_RETRY_CONFIG["retries"])
            opts["config_kwargs"] = config_kwargs
            opts.pop("region", None)  # left to AWS_DEFAULT_REGION (see ENV-NOTES)
            # Other processes (Ray workers) write into the same prefixes: a cached listing
            # would hide their files from this process.
            opts.setdefault("use_listings_cache", False)
        return opts

    def fs(self, url: str) -> tuple[fsspec.AbstractFileSystem, str]:
        """The filesystem holding ``url`` and the path inside it."""
        scheme = protocol(url)
        if scheme not in self._cache:
            options = self._fs_options(scheme)
            # s3fs's own retry loop (around botocore's) is an attribute, not an argument
            retries = options.pop("retries", None) if scheme in ("s3", "s3a") else None
            fs, _ = url_to_fs(url, **options)
            if retries is not None:
                fs.retries = retries
            self._cache[scheme] = fs
        fs = self._cache[scheme]
        return fs, fs._strip_protocol(url)

    def arrow_fs(self, url: str):
        """A ``pyarrow.fs.FileSystem`` and path for ``url`` (for Ray Data and pyarrow I/O)."""
        from pyarrow.fs import FSSpecHandler, LocalFileSystem, PyFileSystem

        fs, path = self.fs(url)
        if protocol(url) == "file":
            return LocalFileSystem(), os.path.abspath(path)
        return PyFileSystem(FSSpecHandler(fs)), path

    # ---- paths --------------------------------------------------------------------------------
    @staticmethod
    def join(url: str, *parts: str) -> str:
        out = url.rstrip("/") if url not in ("/",) else url
        for part in parts:
            part = str(part).strip("/")
            if part:
                out = f"{out}/{part}"
        return out

    def _to_url(self, url_like: str, fs_path: str) -> str:
        scheme = protocol(url_like)
        if scheme == "file" and "://" not in url_like:
            return fs_path
        if scheme == "memory":
            return "memory://" + fs_path.lstrip("/")
        return f"{scheme}://{fs_path}"

    # ---- reading ------------------------------------------------------------------------------
    def exists(self, url: str) -> bool:
        """Whether ``url`` exists (for a range URL: whether its object does)."""
        url = _object_of(url)
        fs, path = self.fs(url)
        with naming("checking", url):
            return fs.exists(path)

    def isdir(self, url: str) -> bool:
        fs, path = self.fs(url)
        with naming("checking", url):
            return fs.isdir(path)

    def size(self, url: str) -> int:
        fs, path = self.fs(url)
        with naming("reading the size of", url):
            return int(fs.size(path))

    def read_bytes(self, url: str) -> bytes:
        """The whole file at ``url``, or the bytes a range URL names."""
        parsed = parse_range_url(url)
        if parsed is not None:
            return self.read_ranges(parsed[0], [parsed[1:3]])[0]
        fs, path = self.fs(url)
        with naming("reading", url):
            return fs.cat_file(path)

    def read_ranges(self, url: str, spans: Sequence[tuple[int, int]]) -> list[bytes]:
        """Bytes ``[start, end)`` of the object at ``url`` for each span, in the order given,
        fetched in as few requests as :func:`merge_ranges` allows. Raises :class:`StorageError`
        when the object is shorter than a span (:class:`ShortRead`: it changed since it was
        indexed)."""
        fs, path = self.fs(url)
        out: list[bytes] = [b""] * len(spans)
        with naming("reading", url):
            for start, end, members in merge_ranges(spans):
                data = fs.cat_file(path, start=start, end=end) if end > start else b""
                if len(data) != end - start:
                    raise ShortRead(f"reading {url} failed: bytes {start}-{end} asked, {len(data)} "
                                    "read (the object is shorter than its index says: it changed)")
                for i in members:
                    s, e = spans[i]
                    out[i] = data[s - start:e - start]
        return out

    def read_image_bytes(self, url: str, max_bytes: int, root: str | None = None) -> bytes:
        """The bytes of an input image, read with bounds.

        A local file must be a regular file (a FIFO or device would block or never end) whose
        real path lies inside ``root``'s (symlinks may point within the data root, never out of
        it); any file must hold at most ``max_bytes`` bytes. A range URL reads only its bytes,
        under the same rules for the object that holds them. Raises :class:`UnreadableFile` with
        the reason otherwise, ``FileNotFoundError`` when it is gone, :class:`StorageError` when
        the read fails.
        """
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        parsed = parse_range_url(url)
        if parsed is not None:
            url, start, end, _ = parsed
            if end - start > max_bytes:
                raise UnreadableFile(f"file larger than {max_bytes} bytes (data.max_file_bytes)")
        fs, path = self.fs(url)
        with naming("reading", url):
            if protocol(url) != "file":
                data = (fs.cat_file(path, start=0, end=max_bytes + 1) if parsed is None
                        else self.read_ranges(url, [(start, end)])[0])
            else:
                span = None if parsed is None else (start, end)
                data = _read_local_bounded(path, max_bytes, None if root is None else self.fs(root)[1], span)
        if len(data) > max_bytes:
            raise UnreadableFile(f"file larger than {max_bytes} bytes (data.max_file_bytes)")
        return data

    def read_text(self, url: str) -> str:
        return self.read_bytes(url).decode("utf-8")

    def read_json(self, url: str) -> Any:
        return json.loads(self.read_text(url))

    def open(self, url: str, mode: str = "rb"):
        fs, path = self.fs(url)
        with naming("opening", url):
            if "w" in mode and protocol(url) == "file":
                fs.makedirs(posixpath.dirname(path) or ".", exist_ok=True)
            return fs.open(path, mode)

    def list_files(self, url: str, suffixes: Iterable[str] | None = None) -> list[str]:
        """All files under ``url`` (recursive), sorted, as URLs of the same scheme.

        ``suffixes`` filters by case-insensitive file-name ending (e.g. ``(".jpeg", ".png")``).
        A missing folder lists as empty.
        """
        wanted = tuple(s.lower() for s in suffixes) if suffixes else None
        return [e.url for e in self.list_entries(url) if wanted is None or e.url.lower().endswith(wanted)]

    def list_entries(self, url: str, follow_links_within: str | None = None) -> list[FileEntry]:
        """Every file under ``url`` (recursive, sorted by URL), with size and kind; a missing folder
        lists as empty. Local symlinks to files are listed, not followed (``link_target`` says
        where they point); sockets, FIFOs and devices are listed as not regular.

        A local symlink to a folder is listed into when ``follow_links_within`` (a local folder)
        holds its target and that target is not listed already (not below ``url``, not visited:
        no loops); its files keep the link's path in their URL and carry their real path in
        ``link_target``. Any other folder link is one entry with ``folder_link`` set."""
        fs, path = self.fs(url)
        with naming("listing", url):
            if not fs.exists(path):
                return []
            found = fs.find(path, withdirs=False, detail=True)
        local = protocol(url) == "file"
        within = os.path.realpath(self.fs(follow_links_within)[1]) if local and follow_links_within else None
        listed = os.path.realpath(path) if local else None
        out = []
        visited: set[str] = set()
        pending = [(name, info, False) for name, info in found.items()]
        while pending:
            name, info, through_link = pending.pop()
            target = None
            regular = info.get("type") == "file"
            if local and (info.get("islink") or through_link):
                target = os.path.realpath(name)
                if os.path.isdir(target):
                    if within is not None and _inside(target, within) and not _inside(target, listed) \
                            and target not in visited:
                        visited.add(target)
                        with naming("listing", name):
                            below = fs.find(name, withdirs=False, detail=True)
                        pending += [(n, i, True) for n, i in below.items()]
                    else:
                        out.append(FileEntry(self._to_url(url, name), 0, False, target, folder_link=True))
                    continue
                regular = os.path.isfile(target) and stat.S_ISREG(os.stat(target).st_mode)
            elif not local and protocol(url) != "memory":
                regular = True  # object stores hold objects, nothing else
            out.append(FileEntry(self._to_url(url, name), int(info.get("size") or 0), regular, target,
                                 version=_version(info)))
        return sorted(out, key=lambda e: e.url)

    def walk_files(self, url: str, follow_links_within: str | None = None) -> Iterator[str]:
        """The URLs of the files under ``url``, one folder at a time, so that a caller who has seen
        enough can stop early (a missing folder yields nothing). Local symlinked folders are
        walked into as :meth:`list_entries` does (targets inside ``follow_links_within``, once)."""
        fs, path = self.fs(url)
        with naming("listing", url):
            if not fs.exists(path):
                return
            if protocol(url) != "file":
                for folder, _, files in fs.walk(path):
                    for name in sorted(files):
                        yield self._to_url(url, posixpath.join(folder, name))
                return
            within = os.path.realpath(self.fs(follow_links_within)[1]) if follow_links_within else None
            seen = {os.path.realpath(path)}
            for folder, dirs, files in os.walk(path, followlinks=True):
                keep = []
                for d in sorted(dirs):
                    real = os.path.realpath(os.path.join(folder, d))
                    if os.path.islink(os.path.join(folder, d)) and (
                            within is None or not _inside(real, within) or real in seen):
                        continue
                    seen.add(real)
                    keep.append(d)
                dirs[:] = keep
                for name in sorted(files):
                    yield self._to_url(url, os.path.join(folder, name))

    def list_relative(self, url: str, suffix: str | None = None) -> dict[str, str]:
        """``{path relative to url: URL}`` of the files under ``url`` whose name ends in ``suffix``
        (case-sensitive), hidden names (temporary files of an interrupted write) left out."""
        _, base = self.fs(url)
        base = base.rstrip("/") + "/"
        out = {}
        for entry in self.list_entries(url):
            _, path = self.fs(entry.url)
            if not path.startswith(base):
                raise StorageError(f"listing of {url} returned {entry.url}, which is outside it")
            rel = path[len(base):]
            if (suffix is None or rel.endswith(suffix)) and not any(is_hidden(p) for p in rel.split("/")):
                out[rel] = entry.url
        return out

    def list_dirs(self, url: str) -> list[str]:
        """Immediate sub-folders of ``url``, sorted, as URLs."""
        fs, path = self.fs(url)
        if not fs.exists(path):
            return []
        entries = fs.ls(path, detail=True)
        return sorted(self._to_url(url, e["name"]) for e in entries if e["type"] == "directory")

    # ---- writing ------------------------------------------------------------------------------
    def makedirs(self, url: str) -> None:
        fs, path = self.fs(url)
        with naming("creating", url):
            if protocol(url) in ("file", "memory"):
                fs.makedirs(path, exist_ok=True)
        # object stores have no folders: nothing to do

    def write_bytes(self, url: str, data: bytes) -> None:
        """Write ``data`` to ``url`` atomically (temporary name, then rename), making parents.
        A failed write leaves no temporary file behind."""
        fs, path = self.fs(url)
        with naming("writing", url):
            if protocol(url) == "file":
                parent = posixpath.dirname(path) or "."
                os.makedirs(parent, exist_ok=True)
                tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}")
                try:
                    with open(tmp, "wb") as f:
                        f.write(data)
                    os.replace(tmp, path)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.remove(tmp)
                    raise
            else:
                # One PUT on an object store is atomic; memory:// is in-process.
                fs.pipe_file(path, data)

    def create_exclusive(self, url: str, data: bytes) -> bool:
        """Write ``data`` to ``url`` only if nothing is there yet; True if this call created it.

        Atomic on local disks (``O_EXCL``) and on object stores that support conditional writes
        (S3's ``If-None-Match``); elsewhere the file is written unless it exists, and callers
        that need certainty read it back (see :mod:`pdso_ray.run_lease`)."""
        fs, path = self.fs(url)
        with naming("creating", url):
            if protocol(url) == "file":
                os.makedirs(posixpath.dirname(path) or ".", exist_ok=True)
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                return True
            if protocol(url) in ("s3", "s3a"):
                try:
                    fs.pipe_file(path, data, mode="create")
                    return True
                except (FileExistsError, OSError) as e:
                    if isinstance(e, FileExistsError) or "PreconditionFailed" in str(e) or "412" in str(e):
                        return False
                    raise
            if fs.exists(path):
                return False
            fs.pipe_file(path, data)
            return True

    def write_text(self, url: str, text: str) -> None:
        self.write_bytes(url, text.encode("utf-8"))

    def write_json(self, url: str, obj: Any) -> None:
        self.write_text(url, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")

    def remove(self, url: str, recursive: bool = False) -> None:
        fs, path = self.fs(url)
        with naming("removing", url):
            if fs.exists(path):
                fs.rm(path, recursive=recursive)

    # ---- stage manifests ----------------------------------------------------------------------
    def write_manifest(self, stage_url: str, payload: Mapping[str, Any]) -> None:
        """Mark a stage folder complete: ``_SUCCESS.json`` with the payload and a timestamp."""
        body = {"completed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **payload}
        self.write_json(self.join(stage_url, MANIFEST_NAME), body)

    def read_manifest(self, stage_url: str) -> dict[str, Any] | None:
        url = self.join(stage_url, MANIFEST_NAME)
        if not self.exists(url):
            return None
        return self.read_json(url)


def _version(info: Mapping[str, Any]) -> str:
    """What changes when a listed file is replaced: an object's ETag, else its modification time."""
    for key in ("ETag", "etag", "mtime", "LastModified", "last_modified", "created"):
        if info.get(key) not in (None, ""):
            return str(info[key])
    return ""


def _inside(path: str, folder: str) -> bool:
    """Whether the real path ``path`` is ``folder`` or below it."""
    return os.path.commonpath([path, folder]) == folder


def _object_of(url: str) -> str:
    """The object a range URL points into; a plain URL itself."""
    parsed = parse_range_url(url)
    return url if parsed is None else parsed[0]


def _read_local_bounded(path: str, max_bytes: int, root: str | None,
                        span: tuple[int, int] | None = None) -> bytes:
    """At most ``max_bytes + 1`` bytes of the regular file at ``path``, or its bytes ``span``
    (see :meth:`Storage.read_image_bytes`). The checks run on the opened descriptor, so a file
    swapped for a FIFO after listing is still caught, and ``O_NONBLOCK`` keeps the open from
    blocking."""
    real = os.path.realpath(path)
    if root is not None:
        real_root = os.path.realpath(root)
        if os.path.commonpath([real, real_root]) != real_root:
            raise UnreadableFile(f"symlink to {real}, outside the data root {real_root}")
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnreadableFile("symlink changed while reading") from None
        raise
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise UnreadableFile("not a regular file (a device, FIFO or socket)")
        if span is not None:
            if span[1] > info.st_size:
                raise ShortRead(f"reading {path} failed: bytes {span[0]}-{span[1]} asked, the file "
                                f"holds {info.st_size} (it is shorter than its index says: it changed)")
            f.seek(span[0])
            return f.read(span[1] - span[0])
        if info.st_size > max_bytes:
            raise UnreadableFile(f"file larger than {max_bytes} bytes (data.max_file_bytes)")
        return f.read(max_bytes + 1)


def _json_default(obj: Any) -> Any:
    # numpy scalars and arrays show up in counts and metrics
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
