"""The skeleton every per-image stage shares (``features``, ``pseudo_labels``, ``predict``)::

    work (driver: the ids to account for) → skip the ids already done → Ray Data blocks
    → the stage's steps (decode, model, writers) → reconcile: every image written or rejected

A :class:`StreamingPass` (a :class:`StreamingStage` is a stage that is one) says four things: which images it must account for and which are
refused before streaming (:meth:`~StreamingStage.work`), which are already done
(:meth:`~StreamingStage.done_ids`), the Ray Data source and steps for the rest
(:meth:`~StreamingStage.dataset`, :meth:`~StreamingStage.steps`), and how to count the result
(:meth:`~StreamingStage.finish`). The last step of every stage returns one row per image, its
``id`` and its ``reason`` ("" when written), and :func:`stream` checks that every image sent in
came back exactly once. Outputs are named by image id (or by a hash of a batch's ids), so a retried
batch overwrites its own files and a re-run only processes what is missing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from pdso_ray.data.listing import Rejected
from pdso_ray.stages.base import BatchStep, PipelineError, RunContext, Stage, map_step
from pdso_ray.storage import Storage
from pdso_ray.tables import iter_row_groups, parquet_files, write_table

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger("pdso_ray")

# Ray Data blocks per streaming run: about one batch each, at most this many.
MAX_BLOCKS = 4096


@dataclass
class Work:
    """What a streaming stage must account for: ``ids`` of the images to process (all of them,
    done or not), ``rows`` (one dict per id, the source of :meth:`StreamingStage.dataset` for
    stages that stream from the driver; empty for stages that read their rows themselves) and
    ``rejected`` (images refused before streaming, e.g. at listing)."""

    ids: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


def write_rejected(storage: Storage, url: str, rejected: Iterable[Rejected]) -> None:
    """``rejected`` as one Parquet file (``id``, ``path``, ``reason``; ``id`` null when the
    listing could not form one)."""
    rejected = list(rejected)
    table = pa.table({"id": pa.array([r.image_id for r in rejected], pa.string()),
                      "path": pa.array([r.path for r in rejected], pa.string()),
                      "reason": pa.array([r.reason for r in rejected], pa.string())})
    write_table(storage, url, table)


def read_rejected(storage: Storage, folder_or_file: str) -> list[Rejected]:
    """The rows of :func:`write_rejected` files (a folder of them, or one file)."""
    files = [folder_or_file] if folder_or_file.endswith(".parquet") else parquet_files(storage, folder_or_file)
    files = [f for f in files if storage.exists(f)]
    out = []
    for table in iter_row_groups(storage, files, columns=["id", "path", "reason"]):
        out += [Rejected(path=p, reason=r, image_id=i) for i, p, r in
                zip(*(table.column(c).to_pylist() for c in ("id", "path", "reason")))]
    return out


def ids_in(storage: Storage, *folders: str) -> set[str]:
    """The non-null ``id`` values of the Parquet files in ``folders``."""
    done: set[str] = set()
    for folder in folders:
        for table in iter_row_groups(storage, folder, columns=["id"]):
            done.update(i for i in table.column("id").to_pylist() if i is not None)
    return done


def reconcile(what: str, listed: int, written: int, rejected: int) -> None:
    """The accounting rule: every image is written or rejected, none twice."""
    if written + rejected != listed:
        raise PipelineError(f"{what}: {written} written + {rejected} rejected != {listed} images; "
                           "re-run the same command to complete the stage")


def stream(ctx: RunContext, ds: "ray.data.Dataset", steps: Sequence[BatchStep], expected: Sequence[str],
           what: str) -> dict[str, str]:
    """Run ``ds`` through ``steps`` (each with its declared resources) and collect ``{id: reason}``
    from the last step; raises if an id of ``expected`` is missing or comes back twice. A progress
    bar (``ctx.console``) counts the finished images, with images/s and the time left."""
    for step in steps:
        ds = map_step(ds, step, ctx.cluster_has_gpu)
    results: dict[str, str] = {}
    repeated = 0
    with ctx.console.progress(len(expected), what) as bar:
        for batch in ds.select_columns(["id", "reason"]).iter_batches(batch_format="numpy"):
            for image_id, reason in zip(batch["id"], batch["reason"]):
                repeated += str(image_id) in results
                results[str(image_id)] = str(reason)
            bar.update(len(batch["id"]))
    missing = set(expected) - set(results)
    if missing or repeated or len(results) != len(expected):
        raise PipelineError(f"{what}: {len(results)} images came back ({repeated} twice, "
                           f"{len(missing)} missing, e.g. {sorted(missing)[:3]}) for {len(expected)} sent")
    return results


def from_rows(rows: list[dict[str, Any]], batch_size: int) -> "ray.data.Dataset":
    """A Ray Dataset of driver-side rows, cut into blocks of about one batch each."""
    import ray.data

    return ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // batch_size, MAX_BLOCKS)))


class StreamingPass:
    """One pass of the skeleton (module docstring) over a set of images. A stage may run several
    (``pseudo_labels`` runs one over validation images to choose its thresholds, then one over
    train images); :class:`StreamingStage` is a stage that is one pass."""

    name: str = "pass"

    def work(self, ctx: RunContext) -> Work:
        raise NotImplementedError

    def done_ids(self, ctx: RunContext) -> set[str]:
        raise NotImplementedError

    def steps(self, ctx: RunContext) -> list[BatchStep]:
        raise NotImplementedError

    def batch_size(self, ctx: RunContext) -> int:
        raise NotImplementedError

    def dataset(self, ctx: RunContext, work: Work, todo: set[str]) -> "ray.data.Dataset":
        """The rows to process (ids in ``todo``); by default ``work.rows`` from the driver."""
        return from_rows([r for r in work.rows if r["id"] in todo], self.batch_size(ctx))

    def finish(self, ctx: RunContext, work: Work, results: dict[str, str]) -> dict[str, Any]:
        """Write what the pass keeps besides its per-image outputs, reconcile, return counts."""
        raise NotImplementedError


def run_pass(ctx: RunContext, step: StreamingPass) -> dict[str, Any]:
    """Run one pass: account, skip what is done, stream the rest, reconcile."""
    work = step.work(ctx)
    done = step.done_ids(ctx)
    todo = [i for i in work.ids if i not in done]
    log.info("%s: %d images, %d already done, %d to process", step.name, len(work.ids),
             len(work.ids) - len(todo), len(todo))
    results: dict[str, str] = {}
    if todo:
        results = stream(ctx, step.dataset(ctx, work, set(todo)), step.steps(ctx), todo, step.name)
    return step.finish(ctx, work, results)


class StreamingStage(StreamingPass, Stage):
    """A per-image stage that is one :class:`StreamingPass`."""

    def run(self, ctx: RunContext) -> dict[str, Any]:
        return run_pass(ctx, self)


def object_column(values: Sequence[Any]) -> np.ndarray:
    """A 1-D object array holding ``values`` as they are (numpy would stack equal-length lists)."""
    out = np.empty(len(values), dtype=object)
    out[:] = list(values)
    return out
