"""Tar shards the WebDataset way: reading a shard's index, grouping members into samples, writing
shards (docs/architecture.md, "Data").

Conventions (those of the ``webdataset`` package, followed exactly so that shards written by any
tool read the same here):

- a member ``dir/name.ext1.ext2`` belongs to the sample with key ``dir/name`` (the member's path
  up to the first dot of its file name) under the extension ``ext1.ext2``, lower-cased; a name
  whose file name starts with a dot has no key and is skipped;
- the members of one sample are consecutive; a key that comes back after another sample began is
  a second sample with the same key (a duplicate), and one extension twice in a sample is a
  duplicate member;
- names like ``__index__`` (a top-level name, or a first component, wrapped in double
  underscores) are metadata, not samples; directories and links are skipped.

:func:`scan_tar` walks the headers of one shard (Python's ``tarfile``, so GNU and PAX long names
work) and returns each regular member's name, data offset and size, plus what stopped it early:
a member cut off by the end of the file, a header that is cut or corrupt, or a file that ends
without the end-of-archive blocks. :func:`group_samples` applies the conventions above.
:func:`tar_bytes` writes a shard in memory (USTAR/PAX, what ``tarfile`` writes) and says where each
member's data landed, so that an index can be written beside it.
"""

from __future__ import annotations

import io
import re
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

BLOCK = 512  # tar's block size: headers and padded data
_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_META = re.compile(r"__[^/]*__($|/)")
# Members whose content the index keeps (small text, read while scanning): the class of a sample.
CLASS_EXTENSIONS = ("cls", "cls.txt")
MAX_CLASS_BYTES = 256


def split_member_name(name: str) -> tuple[str, str] | None:
    """``(key, extension)`` of a member name (extension lower-cased), or None when the name has no
    key (no dot in its file name, or a file name that starts with one)."""
    m = _MEMBER.match(name)
    if m is None:
        return None
    return m.group(1), m.group(2).lower()


def escape_key(rel: str) -> str:
    """A sample key for a relative name: a dot in its file name would start the extension, so it is
    written ``%2E`` (and ``%`` as ``%25``); folders keep theirs."""
    folder, _, name = rel.rpartition("/")
    name = name.replace("%", "%25").replace(".", "%2E")
    return f"{folder}/{name}" if folder else name


def unescape_key(key: str) -> str:
    """Inverse of :func:`escape_key`."""
    folder, _, name = key.rpartition("/")
    name = name.replace("%2E", ".").replace("%25", "%")
    return f"{folder}/{name}" if folder else name


def is_metadata(name: str) -> bool:
    """``__index__``-style names: metadata, never a sample's member."""
    return bool(_META.match(name)) or ("/" not in name and name.startswith("__") and name.endswith("__"))


@dataclass(frozen=True)
class TarMember:
    """One regular member: its name, where its data starts in the shard, its size in bytes."""

    name: str
    offset: int
    size: int

    @property
    def end(self) -> int:
        return self.offset + self.size


@dataclass
class TarScan:
    """What :func:`scan_tar` found: the complete regular ``members`` in file order, the content of
    the class members (``texts``: name → bytes), how many entries were skipped (``skipped``:
    directories, links, metadata), and ``problem`` — why the scan stopped before a proper end
    (None when the shard is whole), with ``cut`` the member whose data the end of the file cut
    off (None when the problem is elsewhere)."""

    members: list[TarMember] = field(default_factory=list)
    texts: dict[str, bytes] = field(default_factory=dict)
    skipped: int = 0
    problem: str | None = None
    cut: TarMember | None = None


def scan_tar(fileobj: BinaryIO, size: int) -> TarScan:
    """Index a tar shard of ``size`` bytes read through the seekable ``fileobj`` (headers and the
    small class members only: on a seekable file the data of other members is skipped).

    The scan never raises on bad data: a member extending past the end of the file is ``cut``
    (``problem`` says so), a header that cannot be parsed or is cut short ends the scan with a
    ``problem`` naming its byte offset and the last good member, and so does a file that ends
    without tar's end-of-archive blocks (it may have been cut exactly between two members).
    """
    scan = TarScan()
    end = 0  # first byte after the last complete member's padded data
    try:
        tar = tarfile.open(fileobj=fileobj, mode="r:")
    except (tarfile.TarError, EOFError) as e:
        scan.problem = f"not a readable tar file ({_tar_error(e)})"
        return scan
    with tar:
        while True:
            try:
                info = tar.next()
            except (tarfile.TarError, EOFError) as e:
                scan.problem = (f"corrupt or truncated tar header at byte {end}{_after(scan)}: "
                                f"{_tar_error(e)}")
                return scan
            if info is None:
                break
            data_end = info.offset_data + info.size
            if data_end > size:
                scan.cut = TarMember(info.name, info.offset_data, info.size)
                scan.problem = (f"truncated: member {info.name!r} needs bytes {info.offset_data}-{data_end}, "
                                f"the shard has {size}")
                return scan
            end = info.offset_data + _padded(info.size)
            if not info.isreg() or is_metadata(info.name):
                scan.skipped += 1
                continue
            member = TarMember(info.name, info.offset_data, info.size)
            scan.members.append(member)
            parsed = split_member_name(info.name)
            if parsed is not None and parsed[1] in CLASS_EXTENSIONS and info.size <= MAX_CLASS_BYTES:
                scan.texts[info.name] = tar.extractfile(info).read()
    scan.problem = _trailer_problem(fileobj, end, size, scan)
    return scan


def _trailer_problem(fileobj: BinaryIO, end: int, size: int, scan: TarScan) -> str | None:
    """After the last member, a whole tar holds only zero blocks (at least one). ``tarfile`` stops
    quietly at a cut or corrupt header; this tells those apart from a proper end."""
    if end >= size:
        return (f"truncated: the shard ends{_after(scan, lead=' right ')} without tar's end-of-archive "
                "blocks (later samples, if any, are lost)")
    fileobj.seek(end)
    rest = fileobj.read(min(size - end, 1 << 20))
    if rest.strip(b"\0"):
        return f"corrupt or truncated tar header at byte {end}{_after(scan)}: the rest of the shard is unreadable"
    return None


def _after(scan: TarScan, lead: str = " ") -> str:
    return f"{lead}after member {scan.members[-1].name!r}" if scan.members else ""


def _tar_error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _padded(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK * BLOCK


@dataclass
class Sample:
    """One WebDataset sample of a shard: its ``key``, its members by extension, and ``problem``
    (why it cannot be used: a duplicate key or member; None when fine)."""

    key: str
    members: dict[str, TarMember] = field(default_factory=dict)
    problem: str | None = None


def group_samples(members: Iterable[TarMember]) -> tuple[list[Sample], list[TarMember]]:
    """Group a shard's members into samples by the conventions of the module docstring.

    Returns ``(samples, keyless)``: the samples in file order, and the members that have no key
    (skipped, as ``webdataset`` skips them). A sample whose key already had a sample earlier in
    the shard gets a ``problem``; so does one holding the same extension twice (the first member
    of that extension is kept in ``members``).
    """
    samples: list[Sample] = []
    keyless: list[TarMember] = []
    first_at: dict[str, int] = {}
    for member in members:
        parsed = split_member_name(member.name)
        if parsed is None:
            keyless.append(member)
            continue
        key, ext = parsed
        if not samples or samples[-1].key != key:
            sample = Sample(key)
            if key in first_at:
                sample.problem = (f"duplicate key {key!r}: an earlier sample of this shard has it "
                                  f"(its first member at byte {first_at[key]}); members of a sample must be consecutive")
            else:
                first_at[key] = member.offset
            samples.append(sample)
        sample = samples[-1]
        if ext in sample.members:
            sample.problem = sample.problem or f"duplicate member {member.name!r} in sample {key!r}"
            continue
        sample.members[ext] = member
    return samples, keyless


def tar_bytes(entries: Sequence[tuple[str, bytes]]) -> tuple[bytes, list[TarMember]]:
    """A tar archive holding ``entries`` (member name, data) in order, and where each member's data
    sits in it. Deterministic: fixed mtime, mode and owner, so equal entries give equal bytes."""
    buf = io.BytesIO()
    members = []
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
            members.append(TarMember(name, tar.offset - _padded(len(data)), len(data)))
    return buf.getvalue(), members
