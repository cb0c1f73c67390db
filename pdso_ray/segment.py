"""``pdso-ray segment MODEL INPUT OUTPUT``: a trained model on new images.

MODEL is a run folder (its ``finetune/model.pt``, PDSO's or else LightCluster's) or a folder
written by ``pdso-ray export-model`` (``config.json`` + ``model.safetensors``). INPUT is read by
the data layer like a run's ``data.root`` (``--layout``: ``folder``, the default, is every image
below INPUT; any layout of :data:`pdso_ray.data.layouts.LAYOUTS` works, with its splits). The
images go through the ``predict`` stage's own pass (:class:`SegmentPass` is a
:class:`~pdso_ray.stages.predict.PredictStage`): the same read and decode, the same Ray Data actor
pool (GPU and bf16 when the cluster has GPUs), the same resize to the model's short side and the
same decision, so a run's own images get exactly the run's predictions.

OUTPUT is laid out like a run folder's predictions (:class:`~pdso_ray.run_layout.RunLayout`)::

    OUTPUT/predictions/<split>/<rel>.png          label PNG at the image's own size, ImageNet-S
                                                  codec (id = R + 256·G, 0 background)
    OUTPUT/predictions/<split>_overlay/<rel>.jpg  with --overlay: the image as decoded for the
                                                  model, the label blended in
    OUTPUT/predictions/<split>_colour/<rel>.png   with --overlay: the label in the report's colours
    OUTPUT/predictions/rejected_<split>.parquet   images that got no label, and why
    OUTPUT/segment.json                           model, input, counts, seconds, images/s

(``<split>`` is ``all`` for a plain folder.) A re-run skips the images whose label exists; every
listed image ends labelled or rejected.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

from pdso_ray.config import ConfigError, PipelineConfig, load_config
from pdso_ray.models.heads import EXPORTED_CONFIG
from pdso_ray.run_layout import RunLayout, load_run_config
from pdso_ray.plan import METHODS
from pdso_ray.stages.base import RunContext
from pdso_ray.stages.predict import PredictStage
from pdso_ray.stages.streaming import run_pass
from pdso_ray.storage import Storage

log = logging.getLogger("pdso_ray")


@dataclass(frozen=True)
class SegmentationModel:
    """Where a trained model is and how it reads images (picklable).

    ``url``: what :func:`pdso_ray.models.heads.load_segmenter` loads (a ``model.pt`` or an
    exported folder); ``num_classes``: C; ``short_side``: the input's short side in pixels, as the
    run predicted; ``batch_size``: the run's prediction batch; ``source``: ``run`` or ``exported``.
    """

    url: str
    num_classes: int
    short_side: int
    batch_size: int
    source: str


def resolve_model(storage: Storage, url: str) -> SegmentationModel:
    """The model at ``url``: an exported model folder, or a run folder with a fine-tuned model
    (PDSO's, else LightCluster's). FileNotFoundError naming both forms otherwise."""
    url = url.rstrip("/")
    if storage.exists(Storage.join(url, EXPORTED_CONFIG)):
        config = storage.read_json(Storage.join(url, EXPORTED_CONFIG))
        return SegmentationModel(url, int(config["num_classes"]), int(config["input"]["short_side"]),
                                 int(config["input"].get("batch_size", 8)), "exported")
    for method in METHODS:
        run = RunLayout(url, method=method)
        if storage.exists(run.finetune_model):
            cfg = load_run_config(storage, url, method) or PipelineConfig()
            from pdso_ray.models.heads import load_segmenter

            _, meta = load_segmenter(run.finetune_model, storage)
            return SegmentationModel(run.finetune_model, int(meta["num_classes"]), cfg.predict.short_side,
                                     cfg.predict.batch_size, "run")
    raise FileNotFoundError(f"no model at {url}: MODEL must be a run folder with a fine-tuned model "
                            f"(finetune/model.pt) or a folder written by `pdso-ray export-model` "
                            f"({EXPORTED_CONFIG} + model.safetensors)")


class SegmentPass(PredictStage):
    """The predict stage's pass with another model, previews (colour and overlay) if asked, and a
    progress bar."""

    name = "segment"

    def __init__(self, model: SegmentationModel, overlay: bool = False):
        self.model = model
        self.overlay = overlay
        self.processed = 0

    def model_url(self, ctx: RunContext) -> str:
        return self.model.url

    def write_previews(self, ctx: RunContext) -> bool:
        """Only with ``--overlay``: the labels are what ``segment`` is asked for."""
        return self.overlay

    def finish(self, ctx: RunContext, work, results: dict[str, str]) -> dict[str, Any]:
        self.processed = len(results)
        return super().finish(ctx, work, results)


def segment_config(model: SegmentationModel, input_url: str, output: str, layout: str,
                   overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """The config the pass runs under: INPUT as ``data.root`` in ``layout``, C and the prediction
    settings from the model, then the user's ``--set`` overrides (Ray, storage, layout options)."""
    from pdso_ray.data.layouts import LAYOUTS

    if layout not in LAYOUTS:
        raise ConfigError(f"--layout {layout!r}: unknown; choose one of {', '.join(LAYOUTS)}")
    return load_config(overrides=[f"data.root={input_url}", f"data.layout={layout}", f"output={output}",
                                  f"data.classes={model.num_classes}",
                                  f"predict.short_side={model.short_side}",
                                  f"predict.batch_size={model.batch_size}", *overrides])


def segment(model_url: str, input_url: str, output: str, *, layout: str = "folder", overlay: bool = False,
            overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Segment every image of ``input_url`` with the model at ``model_url`` into ``output``
    (module docstring); returns what ``segment.json`` holds."""
    from pdso_ray.pipeline import cluster_has_gpu, init_ray
    from pdso_ray.run_lease import RunLease

    probe = load_config(overrides=[f"data.root={input_url}", f"output={output}", "data.classes=1", *overrides])
    storage = Storage(probe.storage_options())
    model = resolve_model(storage, model_url)
    cfg = segment_config(model, input_url, output, layout, overrides)
    if not storage.exists(input_url):
        raise FileNotFoundError(f"input not found: {input_url}")
    if output.rstrip("/") == model_url.rstrip("/"):
        raise ConfigError(f"OUTPUT {output} is the model's run folder: segment into another folder")
    run = RunLayout.from_config(cfg)
    storage.makedirs(output)
    with RunLease(storage, run.lease_file).held():
        init_ray(cfg)
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts images
        ctx = RunContext(cfg=cfg, storage=storage, cluster_has_gpu=cluster_has_gpu(cfg))
        started = time.time()
        step = SegmentPass(model, overlay)
        counts = run_pass(ctx, step)
        seconds = round(time.time() - started, 3)
        summary = {"model": asdict(model), "input": input_url, "layout": layout, "overlay": overlay,
                   "splits": counts["splits"], "notes": counts["notes"], "processed": step.processed,
                   "seconds": seconds,
                   "images_per_second": round(step.processed / seconds, 3) if seconds > 0 else None,
                   "predictions": run.predictions_root}
        storage.write_json(run.segment_summary, summary)
    return summary


def format_segment_summary(summary: dict[str, Any]) -> str:
    """``summary`` (:func:`segment`'s) as a few lines for the terminal."""
    lines = [f"segmented with {summary['model']['url']} ({summary['model']['num_classes']} classes)"]
    for split, info in sorted(summary["splits"].items()):
        lines.append(f"  {split}: {info['images']} images, {info['predicted']} labelled, "
                     f"{info['rejected']} rejected")
    rate = summary["images_per_second"]
    lines.append(f"{summary['processed']} images this run in {summary['seconds']:.1f} s"
                 + (f" ({rate:.2f} images/s)" if rate else ""))
    lines += [f"note: {n}" for n in summary["notes"]]
    lines.append(f"labels: {summary['predictions']}/<split>/ (rejected: rejected_<split>.parquet)")
    return "\n".join(lines)
