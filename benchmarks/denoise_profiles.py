"""The denoising profiles and single-lever ablations, A/B on synthetic worlds (issue 22, docs/method.md
"Profiles"): one pipeline run per (world, classes, data seed, variant), every step's image
purity and the pseudo labels' (and optionally the final model's) validation mIoU.

    python -m benchmarks.denoise_profiles WORKDIR [--world shapes] [--classes 12] [--seeds 21 22 23]
        [--variants paper anchored plain ...] [--train-per-class 20] [--final] [--set KEY=VALUE ...]

Each run is ``pdso-ray run jobs/configs/demo.yaml`` (the demo's stand-ins and sizes) with the
variant's overrides, its data made by ``make_demo_dataset`` (``--world``, ``--classes``, each seed
a data seed; the ``hue`` world with ``--style-seed`` draws random hues per class instead of the
demo's evenly spaced ones). Without ``--final`` the runs stop after the pseudo labels (the stages
that differ between profiles, minutes fewer per run). A run folder already complete is read, not
re-run, so an interrupted benchmark goes on where it stopped. With ``--base VARIANT`` every other
variant's folder starts as a copy of that variant's, so the stages its overrides leave alone are
skipped (the fine-tuning losses: ``--final --base ce --variants ce agmm ...``).

Beside each variant's kept set it prints the like-for-like baseline of the issue: plain k-means #1
purified at the same share, per cluster the images nearest their k-means #1 centroid in the
features stage's space. Output: one line per run, then a Markdown table of mean ± sd over seeds
per variant (``WORKDIR/denoise_profiles.md``, and ``.json`` with every run's numbers).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from pdso_ray.data.synthetic import make_demo_dataset
from pdso_ray.method.cluster_metrics import purity
from pdso_ray.method.denoise import small_loss_subset
from pdso_ray.method.purify import assigned_distances, cluster_means
from pdso_ray.run_layout import RunLayout
from pdso_ray.stages.diagnostics import class_codes
from pdso_ray.storage import Storage
from pdso_ray.tables import arrow_to_vectors, column_values, read_folder

VARIANTS = {
    "paper": ["denoise.profile=paper"],
    "anchored": ["denoise.profile=anchored"],
    "plain": ["denoise.profile=plain"],
    "paper, no backbone tuning": ["denoise.profile=paper", "denoise.finetune_blocks=0"],
    "paper, no CSD": ["denoise.profile=paper", "purify.filter=false"],
    "paper, no SPO": ["denoise.profile=paper", "pseudo_labels.refine.method=none"],
    "anchored, feature space": ["denoise.profile=anchored", "denoise.space=features", "denoise.prototypes=means"],
    # the fine-tuning loss on the default profile's pseudo labels (issue 22 item 4; --final)
    "ce": [],
    "agmm": ["finetune.loss=agmm"],
    "agmm, unlabelled: disagreement": ["finetune.loss=agmm", "finetune.unlabelled=disagreement"],
    "agmm, unlabelled: border": ["finetune.loss=agmm", "finetune.unlabelled=border"],
    "ce, unlabelled: disagreement": ["finetune.unlabelled=disagreement"],
}
PROFILE_VARIANTS = ["paper", "anchored", "plain", "paper, no backbone tuning", "paper, no CSD", "paper, no SPO"]
CONFIG = Path(__file__).resolve().parent.parent / "jobs" / "configs" / "demo.yaml"
STEPS = (("cluster", "k-means #1"), ("denoise_relabel", "relabelling"), ("purify_kmeans2", "k-means #2"),
         ("purify_kept", "kept set"), ("purify_final", "final"))


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def kmeans_kept_at_share(run: RunLayout, share: float) -> float:
    """Purity of plain k-means #1 purified to ``share`` of the images: per cluster the images nearest
    their cluster's mean pooled feature (the features stage's, L2-normalised, what k-means #1 saw)."""
    storage = Storage()
    features = read_folder(storage, run.features_dir, ["id", "feat"])
    x = arrow_to_vectors(features.column("feat"))
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    y = column_values(storage, run.stage_dir("cluster"), "cluster").astype(np.int64)
    k = int(y.max()) + 1
    sums = np.zeros((k, x.shape[1]), dtype=np.float64)
    np.add.at(sums, y, x)
    means = cluster_means(sums, np.bincount(y, minlength=k), np.zeros_like(sums))
    kept = small_loss_subset(assigned_distances(x, means, y), y, k, share)
    return purity(y, class_codes(features.column("id")), kept)


def measure(run: Path) -> dict[str, float | None]:
    """The numbers of one finished run folder (None where a step was not run or scored)."""
    summary = json.loads(Path(RunLayout(str(run)).summary_file).read_text())
    diagnostics = summary.get("diagnostics", {})
    image = diagnostics.get("image", {})
    out: dict[str, float | None] = {}
    for key, _ in STEPS:
        out[key] = image[key]["purity"] if isinstance(image.get(key), dict) else None
    kept = image.get("purify_kept")
    share = kept["images"] / image["cluster"]["images"] if isinstance(kept, dict) else None
    out["kept_share"] = share
    out["kmeans_kept_same_share"] = kmeans_kept_at_share(RunLayout(str(run)), share) if share else None
    labels = diagnostics.get("pseudo_labels", {})
    out["raw"] = labels.get("raw", {}).get("mIoU")
    out["refined"] = labels.get("refined", {}).get("mIoU")
    final = [step["mIoU"] for step in diagnostics.get("ablation", []) if step["step"].startswith("final model")]
    out["final"] = final[0] if final else None
    return out


def _finished(out: Path, final: bool) -> bool:
    summary = Path(RunLayout(str(out)).summary_file)
    if not summary.exists():
        return False
    diagnostics = json.loads(summary.read_text()).get("diagnostics", {})
    return bool(diagnostics.get("ablation") if final else diagnostics.get("pseudo_labels"))


def run_variant(data: str, classes: int, out: Path, overrides: list[str], final: bool, extra: list[str],
                base: Path | None = None) -> None:
    if _finished(out, final):
        return
    if base is not None and not out.exists():
        shutil.copytree(base, out, ignore=shutil.ignore_patterns("logs", "report", "tensorboard"))
    stages = [] if final else ["--set", "stages=features,cluster,denoise,purify,pseudo_labels"]
    sets = [f"data.root={data}", f"data.classes={classes}", f"output={out}", "previews=none", *overrides, *extra]
    cmd = [sys.executable, "-m", "pdso_ray.cli", "run", str(CONFIG), *stages,
           *[a for s in sets for a in ("--set", s)]]
    log = out.parent / f"{out.name}.log"
    with open(log, "w") as fh:
        if subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode:
            raise SystemExit(f"error: run failed: {' '.join(cmd)} (log: {log})")


def _cell(values: list[float | None], scale: float = 1.0, digits: int = 3) -> str:
    got = [v * scale for v in values if v is not None]
    if not got:
        return "–"
    return f"{np.mean(got):.{digits}f} ± {np.std(got):.{digits}f}"


def table(results: dict[str, list[dict[str, float | None]]]) -> str:
    head = ["variant", *[name for _, name in STEPS], "k-means #1 kept at that share", "raw mIoU", "refined mIoU",
            "final mIoU"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, runs in results.items():
        col = lambda k: [r[k] for r in runs]  # noqa: E731
        kept = f"{_cell(col('purify_kept'))} ({_cell(col('kept_share'), 100, 0)}%)"
        cells = [variant, *[_cell(col(k)) for k, _ in STEPS[:3]], kept, _cell(col("purify_final")),
                 _cell(col("kmeans_kept_same_share")),
                 *[_cell(col(k), 1.0, 1) for k in ("raw", "refined", "final")]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("workdir")
    p.add_argument("--world", default="shapes", choices=("shapes", "hue"))
    p.add_argument("--classes", type=int, default=12)
    p.add_argument("--seeds", type=int, nargs="+", default=[21, 22, 23])
    p.add_argument("--style-seed", type=int, default=None, help="the class set (shapes) or random hues (hue)")
    p.add_argument("--variants", nargs="+", default=PROFILE_VARIANTS, choices=list(VARIANTS), metavar="VARIANT")
    p.add_argument("--base", choices=list(VARIANTS), help="copy this variant's run folder for the others")
    p.add_argument("--train-per-class", type=int, default=20)
    p.add_argument("--final", action="store_true", help="also fine-tune, predict and evaluate the final model")
    p.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                   help="an override for every run")
    args = p.parse_args(argv)
    work = Path(args.workdir).resolve()
    order = [args.base, *[v for v in args.variants if v != args.base]] if args.base else args.variants
    results: dict[str, list[dict[str, float | None]]] = {v: [] for v in order}
    for seed in args.seeds:
        data = make_demo_dataset(str(work / f"data-{args.world}{args.classes}-s{seed}"), classes=args.classes,
                                 train_per_class=args.train_per_class, val_per_class=4, test_per_class=2,
                                 seed=seed, world=args.world, style_seed=args.style_seed)
        folder = {v: work / f"{args.world}{args.classes}-s{seed}-{_slug(v)}" for v in order}
        for variant in order:
            base = folder[args.base] if args.base and variant != args.base else None
            run_variant(str(Path(data).parent), args.classes, folder[variant], VARIANTS[variant], args.final,
                        args.extra, base)
            out = folder[variant]
            numbers = measure(out)
            results[variant].append(numbers)
            print(f"seed {seed} {variant}: " + " ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} -"
                                                      for k, v in numbers.items()), flush=True)
    text = (f"{args.world} world, {args.classes} classes, {args.train_per_class} train images per class, "
            f"data seeds {args.seeds}; mean ± sd over seeds\n\n{table(results)}\n")
    print(text)
    (work / "denoise_profiles.md").write_text(text)
    (work / "denoise_profiles.json").write_text(json.dumps({"args": vars(args), "runs": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
