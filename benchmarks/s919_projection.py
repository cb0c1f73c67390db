"""ImageNet-S919 end to end in GPU-hours per stage, from the rates ``benchmarks/gpu_suite.py``
measured on one GPU.

Assumptions (each also written into the output): the 1,183,322 ImageNet-S919 train images pass
through every per-image stage once, fine-tuning trains ``finetune.epochs`` epochs of the job
config over all of them (a few have no refined label), k-means runs three times (``cluster``, and
``purify``'s #2 and #3) at the job config's iterations, and the data-parallel stages scale linearly
with GPUs (GPU-hours stay the same, wall time divides). Stages the suite does not measure say so
instead of guessing. Pretraining is not a stage of the job (it loads the official DINO
checkpoint); its row projects what training the backbone here would cost, for an assumed number
of epochs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

S919_TRAIN_IMAGES = 1_183_322


@dataclass
class StageCost:
    """One line of the projection: ``gpu_hours`` None when not measured (``note`` says why)."""

    stage: str
    work: str
    rate: str
    gpu_hours: float | None
    note: str = ""


def _value(rows: dict[str, Any], name: str) -> float | None:
    row = rows.get(name)
    return row.path_value if row is not None and row.status == "measured" else None


def _missing(name: str, rows: dict[str, Any]) -> str:
    row = rows.get(name)
    return f"row {name} not measured" + (f" ({row.note})" if row is not None and row.note else "")


def project(rows: dict[str, Any], job, profile, pretrain_epochs: int) -> dict[str, Any]:
    """The projection from the suite's rows (by name), the job config and the run's profile."""
    n = S919_TRAIN_IMAGES
    costs: list[StageCost] = []

    rate = _value(rows, "features")
    costs.append(StageCost("features", f"{n:,} images, DINO {job.models.dino.arch} at {job.models.dino.image_size} "
                           "+ flip", f"{rate:,.0f} img/s" if rate else "-",
                           n / rate / 3600 if rate else None,
                           "steady-state rate of the stage" if rate else _missing("features", rows)))

    seconds = _value(rows, "kmeans_torch")
    # Lloyd's cost is linear in the rows and the iterations: seconds per iteration at n rows.
    per_iteration = seconds * (n / profile.kmeans_n) / profile.kmeans_niter if seconds else None
    kmeans_rate = f"{seconds:.2f} s / {profile.kmeans_niter} it. at {profile.kmeans_n:,} rows" if seconds else "-"
    kmeans_note = "" if seconds else _missing("kmeans_torch", rows)
    costs.append(StageCost("cluster", f"k-means #1, {n:,} × 384 → {job.data.classes}, {job.cluster.niter} it.",
                           kmeans_rate, per_iteration * job.cluster.niter / 3600 if seconds else None, kmeans_note))
    costs.append(StageCost("denoise", f"f, g, h over {n:,} × 384: {job.denoise.epochs_f} + {job.denoise.epochs_g} + "
                           f"{job.denoise.epochs_h} epochs", "-", None, "not measured by this suite"))
    costs.append(StageCost("purify", f"k-means #2 and #3, {job.purify.niter} it. each", kmeans_rate,
                           2 * per_iteration * job.purify.niter / 3600 if seconds else None,
                           "the filters and top-k run on CPUs" if seconds else kmeans_note))

    spo = [r for r in (_value(rows, "spo"), _value(rows, "spo_compiled")) if r]
    best = max(spo) if spo else None
    costs.append(StageCost("pseudo_labels", f"{n:,} images, SAM {job.models.sam.arch} SPO",
                           f"{best:,.1f} img/s" if best else "-", n / best / 3600 if best else None,
                           f"SPO only (the faster of eager and compiled); the DINO pass at "
                           f"{job.pseudo_labels.image_size} px is not measured" if best else _missing("spo", rows)))

    steps = _value(rows, "finetune")
    batch = profile.finetune_batch  # the measured batch (the job config's, in the gpu profile)
    costs.append(StageCost("finetune", f"{job.finetune.epochs} epochs × {n:,} images, batch {batch}",
                           f"{steps:.2f} steps/s" if steps else "-",
                           job.finetune.epochs * n / (steps * batch) / 3600 if steps else None,
                           "" if steps else _missing("finetune", rows)))
    costs.append(StageCost("predict", "validation + test images", "-", None, "not measured by this suite"))

    measured_hours = [c.gpu_hours for c in costs if c.gpu_hours is not None]
    total = sum(measured_hours) if measured_hours else None

    steps = _value(rows, "pretrain")
    pretrain = StageCost("pretrain (not in the job)",
                         f"{pretrain_epochs} epochs (assumed) × {n:,} images, batch {profile.pretrain_batch}",
                         f"{steps:.2f} steps/s" if steps else "-",
                         pretrain_epochs * n / (steps * profile.pretrain_batch) / 3600 if steps else None,
                         "the job loads the official DINO checkpoint" if steps else _missing("pretrain", rows))

    pil = rows["decode"].baseline_value if _value(rows, "decode") else None
    decodes = (2 + job.finetune.epochs) * n  # features, pseudo_labels, every fine-tuning epoch
    decode_note = (f"{decodes:,} decodes (features, pseudo_labels, {job.finetune.epochs} fine-tuning epochs) at "
                   f"{pil:,.0f} img/s per core (PIL): {decodes / pil / 3600:,.1f} core-hours" if pil else
                   _missing("decode", rows))
    return {
        "assumptions": {"train_images": n, "finetune_epochs": job.finetune.epochs,
                        "cluster_niter": job.cluster.niter, "purify_niter": job.purify.niter,
                        "pretrain_epochs_assumed": pretrain_epochs, "profile": profile.name,
                        "scaling": "linear in images, epochs and k-means rows and iterations; one GPU's rates"},
        "valid": profile.name == "gpu",  # smoke rates come from tiny models: they project nothing
        "stages": [asdict(c) for c in costs],
        "total_measured_gpu_hours": total,
        "stages_not_measured": [c.stage for c in costs if c.gpu_hours is None],
        "pretrain": asdict(pretrain),
        "decode_cpu": decode_note,
    }
