"""The one storage seam: every file the pipeline reads or writes goes through :class:`Storage`.

URLs may be plain paths, ``file://``, ``s3://bucket/key`` or ``memory://``. S3 settings come from
the config (``storage.s3``) or from the usual AWS environment variables; credentials are kept in
the object only, never in what it returns as text.

Writes are atomic: data goes to a temporary name in the same folder, then is moved into place
(on S3 a single PUT is already atomic), so a retried task overwrites instead of leaving halves.
"""

from __future__ import annotations

import json
import os
import posixpath
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import fsspec
from fsspec.core import url_to_fs

MANIFEST_NAME = "_SUCCESS.json"

# botocore retries transient S3 errors (throttling, 5xx, connection resets) with backoff.
_S3_RETRY_CONFIG = {"retries": {"max_attempts": 8, "mode": "adaptive"}}


def _protocol(url: str) -> str:
    if "://" in url:
        return url.split("://", 1)[0]
    return "file"


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
    def _fs_options(self, protocol: str) -> dict[str, Any]:
        opts = dict(self.options.get(protocol, {}))
        if protocol in ("s3", "s3a"):
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
        protocol = _protocol(url)
        if protocol not in self._cache:
            fs, _ = url_to_fs(url, **self._fs_options(protocol))
            self._cache[protocol] = fs
        fs = self._cache[protocol]
        return fs, fs._strip_protocol(url)

    def arrow_fs(self, url: str):
        """A ``pyarrow.fs.FileSystem`` and path for ``url`` (for Ray Data and pyarrow I/O)."""
        from pyarrow.fs import FSSpecHandler, LocalFileSystem, PyFileSystem

        fs, path = self.fs(url)
        if _protocol(url) == "file":
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
        protocol = _protocol(url_like)
        if protocol == "file" and "://" not in url_like:
            return fs_path
        if protocol == "memory":
            return "memory://" + fs_path.lstrip("/")
        return f"{protocol}://{fs_path}"

    # ---- reading ------------------------------------------------------------------------------
    def exists(self, url: str) -> bool:
        fs, path = self.fs(url)
        return fs.exists(path)

    def isdir(self, url: str) -> bool:
        fs, path = self.fs(url)
        return fs.isdir(path)

    def read_bytes(self, url: str) -> bytes:
        fs, path = self.fs(url)
        try:
            return fs.cat_file(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"no such file: {url}") from None

    def read_text(self, url: str) -> str:
        return self.read_bytes(url).decode("utf-8")

    def read_json(self, url: str) -> Any:
        return json.loads(self.read_text(url))

    def open(self, url: str, mode: str = "rb"):
        fs, path = self.fs(url)
        if "w" in mode and _protocol(url) == "file":
            fs.makedirs(posixpath.dirname(path) or ".", exist_ok=True)
        return fs.open(path, mode)

    def list_files(self, url: str, suffixes: Iterable[str] | None = None) -> list[str]:
        """All files under ``url`` (recursive), sorted, as URLs of the same scheme.

        ``suffixes`` filters by case-insensitive file-name ending (e.g. ``(".jpeg", ".png")``).
        A missing folder lists as empty.
        """
        fs, path = self.fs(url)
        if not fs.exists(path):
            return []
        found = fs.find(path, withdirs=False)
        wanted = tuple(s.lower() for s in suffixes) if suffixes else None
        out = [
            self._to_url(url, p)
            for p in found
            if wanted is None or p.lower().endswith(wanted)
        ]
        return sorted(out)

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
        if _protocol(url) in ("file", "memory"):
            fs.makedirs(path, exist_ok=True)
        # object stores have no folders: nothing to do

    def write_bytes(self, url: str, data: bytes) -> None:
        """Write ``data`` to ``url`` atomically (temporary name, then rename), making parents."""
        fs, path = self.fs(url)
        if _protocol(url) == "file":
            parent = posixpath.dirname(path) or "."
            os.makedirs(parent, exist_ok=True)
            tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}")
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        else:
            # One PUT on an object store is atomic; memory:// is in-process.
            fs.pipe_file(path, data)

    def write_text(self, url: str, text: str) -> None:
        self.write_bytes(url, text.encode("utf-8"))

    def write_json(self, url: str, obj: Any) -> None:
        self.write_text(url, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")

    def remove(self, url: str, recursive: bool = False) -> None:
        fs, path = self.fs(url)
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


def _json_default(obj: Any) -> Any:
    # numpy scalars and arrays show up in counts and metrics
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
