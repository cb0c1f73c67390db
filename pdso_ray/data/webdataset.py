"""``data.layout: webdataset``: images in WebDataset tar shards (docs/architecture.md, "Data").

``data.root`` holds ``*.tar`` shards, in split folders (``train/``, ``validation/``, ``test/``) or
named by split (``train-000001.tar``), or without splits (the one split ``all``;
:mod:`pdso_ray.data.sources`). Each shard's samples follow the WebDataset conventions
(:mod:`pdso_ray.data.tar_shards`):

- the image is the sample's ``jpg``, ``jpeg``, ``png`` or ``webp`` member (the first of these it
  has); its id is ``{split}/{shard name}/{key}``, stable as long as the shard is;
- an optional ``cls`` (or ``cls.txt``) member holds its class, an integer or a name, which the
  per-run diagnostics score the clustering against;
- an optional ``seg.png`` member is its ground truth, in the ImageNet-S label codec.

Every sample is accounted for. Rejected, each with a reason naming the shard and the key: a
sample whose key repeats one earlier in the shard, one with the same member twice, one whose
image member is missing (it has a class or a mask but no image) or too large, one whose key
cannot become an id, one cut off by the end of a truncated shard; a shard that is cut or corrupt
elsewhere (a header) adds one rejection without an id, since what it lost cannot be counted.
Samples with no image and nothing else, keyless members and files that are not shards are
ignored and counted. A member whose bytes do not decode is rejected when it is read, with the
same naming.

Listing a split reads every shard's headers (:func:`pdso_ray.data.tar_shards.scan_tar`, several
shards at a time). Headers sit between the members, so on an object store this reads about the
whole shard once; the index is kept for the rest of the run. Shards written by ``pdso-ray
make-shards`` come with a small index file beside them (``.<shard>.tar.idx.parquet``,
:func:`write_shard_index`), read instead when it was made for a shard of the same size. Images are
then read as byte ranges of their shard (:meth:`pdso_ray.storage.Storage.read_ranges`): a batch of
neighbouring samples is one request.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pyarrow as pa

from pdso_ray.data.listing import ImageRecord, Rejected, SplitListing
from pdso_ray.data.sources import ContainerLayout, SourceFile, SplitIndex, class_value, index_files, index_url
from pdso_ray.data.tar_shards import (CLASS_EXTENSIONS, Sample, TarMember, TarScan, group_samples, scan_tar,
                                      split_member_name, unescape_key)
from pdso_ray.data.ids import image_id, png_rel, unsafe_reason
from pdso_ray.storage import Storage, range_url
from pdso_ray.tables import read_table, write_table

SHARD_SUFFIX = ".tar"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # in order of preference
GT_EXTENSION = "seg.png"
_SHARD_SIZE = "pdso_ray.shard_size"  # the schema metadata key of a shard index: the shard's bytes


@dataclass
class ShardListing:
    """One shard, listed (see :class:`pdso_ray.data.sources.SplitIndex`)."""

    images: list[ImageRecord] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    gt: dict[str, str] = field(default_factory=dict)


def member_url(shard_url: str, member: TarMember) -> str:
    """The range URL of a member's bytes in its shard."""
    return range_url(shard_url, member.offset, member.end, member.name)


def write_shard_index(storage: Storage, shard_url: str, size: int, members: Sequence[TarMember],
                      texts: Mapping[str, bytes]) -> None:
    """Write a shard's index beside it (:func:`~pdso_ray.data.sources.index_url`): each member's
    name, data offset and size, the class members' text, and the shard's size, so that listing
    it later reads this small file instead of the shard's headers."""
    table = pa.table({"name": [m.name for m in members], "offset": pa.array([m.offset for m in members], pa.int64()),
                      "size": pa.array([m.size for m in members], pa.int64()),
                      "text": pa.array([texts.get(m.name) for m in members], pa.binary())})
    write_table(storage, index_url(shard_url), table.replace_schema_metadata({_SHARD_SIZE: str(size)}))


def _indexed_scan(storage: Storage, url: str, size: int) -> TarScan | None:
    """The scan a shard's index records, None when the index is unreadable or was made for a
    shard of another size (it changed since)."""
    try:
        table = read_table(storage, url)
        if int((table.schema.metadata or {}).get(_SHARD_SIZE.encode(), b"-1")) != size:
            return None
        rows = table.to_pydict()
    except (OSError, ValueError, pa.ArrowException):
        return None
    members = [TarMember(n, o, s) for n, o, s in zip(rows["name"], rows["offset"], rows["size"])]
    return TarScan(members=members, texts={n: t for n, t in zip(rows["name"], rows["text"]) if t is not None})


def list_shard(storage: Storage, source: SourceFile, max_file_bytes: int, index: str | None = None) -> ShardListing:
    """Index one shard — from its index file when there is a valid one (``index``), else by
    reading its headers — and sort its samples into images, rejections and ignored entries
    (module docstring)."""
    scan = _indexed_scan(storage, index, source.size) if index is not None else None
    if scan is None:
        with storage.open(source.url, "rb") as f:
            scan = scan_tar(f, source.size)
    samples, keyless = group_samples(scan.members)
    out = ShardListing(ignored=[member_url(source.url, m) for m in keyless])
    cut_key = None
    if scan.cut is not None:
        parsed = split_member_name(scan.cut.name)
        cut_key = parsed[0] if parsed else None
        if cut_key is not None and (not samples or samples[-1].key != cut_key):
            samples.append(Sample(cut_key))  # the sample begins with the cut member
    for sample in samples:
        if sample.key == cut_key and sample is samples[-1]:
            sample.problem = (f"truncated shard: member {scan.cut.name!r} is cut off "
                              f"({source.size - scan.cut.offset} of its {scan.cut.size} bytes are there)")
        _add_sample(out, source, sample, scan.texts, max_file_bytes)
    if scan.problem is not None and (scan.cut is None or cut_key is None):
        out.rejected.append(Rejected(path=source.url, reason=f"shard {source.url}: {scan.problem}"))
    return out


def _add_sample(out: ShardListing, source: SourceFile, sample: Sample, texts: dict[str, bytes],
                max_file_bytes: int) -> None:
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in sample.members), None)
    if image_ext is None and sample.problem is None:
        labelled = [e for e in (*CLASS_EXTENSIONS, GT_EXTENSION) if e in sample.members]
        if not labelled:  # captions, metadata: nothing of an image sample
            out.ignored += [member_url(source.url, m) for m in sample.members.values()]
            return
        sample.problem = (f"no image member ({', '.join(IMAGE_EXTENSIONS)}) beside its "
                          f"{', '.join(labelled)}")
    first = sample.members[image_ext] if image_ext else next(iter(sample.members.values()), None)
    path = member_url(source.url, first) if first is not None else source.url
    rel = f"{source.name}/{sample.key}"
    problem = unsafe_reason(rel)
    candidate = image_id(source.split, rel) if problem is None else None
    problem = sample.problem or problem
    if problem is None and first.size > max_file_bytes:
        problem = f"image member of {first.size} bytes, larger than {max_file_bytes} (data.max_file_bytes)"
    if problem is not None:
        out.rejected.append(Rejected(path=path, reason=f"{problem} (shard {source.url}, key {sample.key!r})",
                                     image_id=candidate, rel=rel))
        return
    cls = next((texts[m.name] for e, m in sample.members.items() if e in CLASS_EXTENSIONS and m.name in texts), None)
    out.images.append(ImageRecord(id=candidate, path=path, split=source.split, wnid=class_value(cls),
                                  version=source.version))
    if GT_EXTENSION in sample.members:
        out.gt[png_rel(candidate)] = member_url(source.url, sample.members[GT_EXTENSION])


@dataclass(frozen=True)
class WebDatasetLayout(ContainerLayout):
    """WebDataset tar shards (module docstring)."""

    name = "webdataset"
    what = "shard"
    gt_what = "seg.png"

    def source_name(self, image_id: str) -> str:
        """The sample's key, unescaped (:func:`~pdso_ray.data.tar_shards.unescape_key`: shards made
        by make-shards give back the source's name, e.g. ``<wnid>/<stem>``)."""
        split, rest = image_id.split("/", 1)
        names = sorted((f.name for f in self.sources.splits.get(split, []) if rest.startswith(f.name + "/")),
                       key=len)
        return unescape_key(rest[len(names[-1]) + 1:] if names else rest)

    def count_in(self, storage: Storage, source: SourceFile, split: str) -> int:
        return len(list_shard(storage, source, self.max_file_bytes, self.sources.indexes.get(source.url)).images)

    def index_split(self, storage: Storage, split: str) -> SplitIndex:
        shards = index_files(self.sources.splits[split], lambda source: list_shard(
            storage, source, self.max_file_bytes, self.sources.indexes.get(source.url)))
        listing = SplitListing(split=split)
        found = SplitIndex(listing)
        for shard in shards:
            listing.images += shard.images
            listing.rejected += shard.rejected
            listing.ignored += shard.ignored
            found.gt.update(shard.gt)
        if split == self.train_split():
            listing.ignored += self.sources.ignored
        found.without_gt = sum(1 for r in listing.images if png_rel(r.id) not in found.gt) if found.gt else 0
        return found
