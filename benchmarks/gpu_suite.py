"""The GPU check: one command that measures every GPU path of pdso-ray against a baseline measured
in the same run, and projects ImageNet-S919 in GPU-hours per stage.

    python benchmarks/gpu_suite.py --out runs/gpu_suite          # on a CUDA host: <= 7.5 min
    python benchmarks/gpu_suite.py --smoke --out /tmp/gs         # same code, tiny sizes, CPU, ~1 min

Checks, in this order, each with its own time cap (skipped with a note when the budget left is
smaller; stopped at the cap if it overruns), each interleaved with its baseline for ``--rounds``
rounds (A, B, A, B, ...; the ratio is the median of the per-round ratios, see timing.py):

=============  =======================================================  ======================================
row            path                                                     baseline
=============  =======================================================  ======================================
decode         data.batch_decode on the GPU (nvJPEG, batched) + resize  PIL, as the CPU path decodes, one core
features       the real FeaturesStage on a local Ray, batches 2..n       bare bf16 forward, same model and batch
kmeans_torch   pdso_ray.kmeans, torch kernel on the GPU                  faiss-cpu on every core
kmeans_faiss…  faiss-gpu (when installed)                                faiss-cpu
spo            refine_spo, batched, bf16                                 the naive loop of sam_refine.py, fp32
finetune       train_loop_per_worker (Ray Train local mode)              bare loop of the same steps
pretrain       DinoPretrainer.step (GPU multi-crop)                      bare loop on pre-made views
spo_compiled   refine_spo with a torch.compile'd encoder                 the naive loop (compile time apart)
=============  =======================================================  ======================================

The models are the real architectures with random weights (DINO ViT-S/8 at 224, SAM ViT-B at
1024; timing needs no checkpoint) at the sizes of ``jobs/configs/imagenet_s919.yaml``; the JPEGs
are synthetic and written to a scratch folder on local disk. A ratio above 1 against a bare loop
is flagged as a measurement error. Output: the table and the projection on stdout, all of it as
``OUT/gpu_suite.json``; exit status 1 when a check failed (its error is in the row's note).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import traceback
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


class CapExceeded(Exception):
    """A check ran past its time cap."""


@contextlib.contextmanager
def hard_cap(seconds: float):
    """Raise :class:`CapExceeded` in this (main) thread after ``seconds``."""
    def stop(signum, frame):
        raise CapExceeded(f"stopped at its cap of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def error_note(e: BaseException) -> str:
    """One line for a row's note: the exception's type, its first and last lines (a Ray task
    error wraps the worker's traceback; its cause is the last line), no terminal colours."""
    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines() if ln.strip()]
    text = " ... ".join(dict.fromkeys([lines[0], lines[-1]])) if lines else ""
    return f"{type(e).__name__}: {text}"[:400]


def run_checks(ctx, checks, budget_s: float, started: float, only: set[str] | None) -> list:
    """Run each check under its cap while the budget lasts; every row of every check comes back,
    measured, skipped (with the reason) or failed (with the error)."""
    from gpu_suite_core import Row, free_gpu

    rows = []
    for check in checks:
        specs = check.specs(ctx)
        cap = ctx.profile.caps[check.name]
        left = budget_s - (time.monotonic() - started)
        if only is not None and check.name not in only:
            rows += [Row(s, note="not selected (--only)") for s in specs]
            continue
        if left < cap:
            rows += [Row(s, note=f"budget: {left:.0f} s left, its cap is {cap:.0f} s") for s in specs]
            continue
        t0, c0 = time.monotonic(), time.process_time()
        try:
            with hard_cap(cap):
                new = check.run(ctx, specs)
        except CapExceeded as e:
            new = [Row(s, note=str(e)) for s in specs]
            ctx.stop_ray()  # whatever it left running on Ray must not slow the next checks
        except Exception as e:  # noqa: BLE001 - one broken check must not cost the others
            traceback.print_exc()
            new = [Row(s, status="failed", note=error_note(e)) for s in specs]
        seconds = time.monotonic() - t0
        for row in new:
            row.seconds, row.cpu_seconds = seconds, time.process_time() - c0
            if row.status == "measured" and not row.finite():
                row.status, row.note = "failed", f"non-finite numbers: {row.to_json()}"[:400]
        rows += new
        free_gpu()
        print(f"[{time.monotonic() - started:5.0f} s] {check.name}: "
              f"{', '.join(f'{r.spec.name} {r.status}' for r in new)} in {seconds:.1f} s "
              f"({time.process_time() - c0:.1f} s CPU)", file=sys.stderr, flush=True)
    return rows


def _number(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    if abs(value) < 1:
        return f"{value:.{digits + 1}g}"  # 0.0123, not 0.01
    return f"{value:,.{digits}f}" if abs(value) < 1e5 else f"{value:,.0f}"


def print_table(report: dict[str, Any]) -> None:
    meta = report["meta"]
    print(f"\nGPU check — profile {meta['profile']}, {meta['device']}, torch {meta['torch']}, "
          f"{meta['rounds']} interleaved rounds per row, {meta['elapsed_s']:.0f} s of a {meta['budget_s']:.0f} s budget")
    print("ratio = median over rounds of path speed / baseline speed (> 1: the path is faster)\n")
    header = f"{'row':17s}{'status':10s}{'path':>12s}{'baseline':>12s}  {'unit':13s}{'ratio':>8s}  rounds"
    print(header)
    print("-" * len(header))
    for r in report["rows"]:
        rounds = " ".join(f"{x:.2f}" for x in r["ratios"])
        print(f"{r['name']:17s}{r['status']:10s}{_number(r['path_value']):>12s}{_number(r['baseline_value']):>12s}  "
              f"{r['unit']:13s}{_number(r['ratio']):>8s}  {rounds}")
        if r["flag"]:
            print(f"{'':17s}!! {r['flag']}")
        if r["note"]:
            print(f"{'':17s}note: {r['note']}")
    print("\nrows:")
    for r in report["rows"]:
        print(f"  {r['name']}: {r['what']}\n      path: {r['path']}\n      baseline: {r['baseline']}")
        if r["extra"]:
            print("      " + ", ".join(f"{k} {_number(v, 3)}" for k, v in r["extra"].items()))
    proj = report["projection"]
    print(f"\nImageNet-S919 projection ({proj['assumptions']['train_images']:,} train images; "
          f"job config: finetune {proj['assumptions']['finetune_epochs']} epochs, k-means "
          f"{proj['assumptions']['cluster_niter']} it.), one GPU's measured rates:")
    if not proj["valid"]:
        print("  (smoke profile: tiny models at tiny sizes; these lines test the code, they project nothing)")
    print(f"  {'stage':28s}{'GPU-hours':>10s}  {'rate':34s}work / note")
    for c in [*proj["stages"], proj["pretrain"]]:
        note = f"; {c['note']}" if c["note"] else ""
        print(f"  {c['stage']:28s}{_number(c['gpu_hours']):>10s}  {c['rate']:34s}{c['work']}{note}")
    print(f"  {'total (measured job stages)':28s}{_number(proj['total_measured_gpu_hours']):>10s}  "
          f"not measured: {', '.join(proj['stages_not_measured']) or 'none'}")
    print(f"  decode on CPUs: {proj['decode_cpu']}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny models and sizes on the CPU (~1 min)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="seconds for the whole run, start-up included (default: 450 GPU, 300 smoke)")
    ap.add_argument("--out", default=os.path.join("runs", "gpu_suite"), help="folder for gpu_suite.json")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto: CUDA for the full run, CPU for --smoke")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per comparison (>= 3)")
    ap.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                    help="try torch.compile of the SAM encoder (auto: on CUDA only)")
    ap.add_argument("--only", default=None, help="comma-separated checks to run (others are skipped)")
    ap.add_argument("--job-config", default=os.path.join(REPO, "jobs", "configs", "imagenet_s919.yaml"))
    ap.add_argument("--pretrain-epochs", type=int, default=100,
                    help="epochs assumed for the pretraining projection (not part of the job)")
    ap.add_argument("--work-dir", default=None, help="where the scratch folder goes (default: the system temp)")
    ap.add_argument("--keep-work", action="store_true", help="keep the scratch folder (JPEGs, run folders)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    # pdso_ray and these modules for this process and for Ray's workers (which inherit the
    # environment): the suite runs from a bare checkout too.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, HERE, os.environ.get("PYTHONPATH")]))
    sys.path[:0] = [p for p in (HERE, REPO) if p not in sys.path]

    import torch

    import gpu_checks
    import gpu_train_checks
    from gpu_suite_core import Context, gpu_profile, smoke_profile, synthetic_jpegs
    from pdso_ray.config import load_config
    from s919_projection import project

    device = args.device if args.device != "auto" else ("cpu" if args.smoke else "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device; run with --smoke for the CPU check", file=sys.stderr)
        return 2
    if args.rounds < 3:
        print(f"error: --rounds must be >= 3, got {args.rounds}", file=sys.stderr)
        return 2
    job = load_config(args.job_config)
    profile = smoke_profile() if args.smoke else gpu_profile(job)
    budget = args.budget_s if args.budget_s is not None else profile.budget_s
    threads = 1 if args.smoke else os.cpu_count() or 1
    if args.smoke:
        torch.set_num_threads(1)
    compile_encoder = {"on": True, "off": False}.get(args.compile, device == "cuda")
    only = set(args.only.split(",")) if args.only else None
    checks = [*gpu_checks.CHECKS, *gpu_train_checks.CHECKS, gpu_checks.COMPILE_CHECK]
    unknown = (only or set()) - {c.name for c in checks}
    if unknown:
        print(f"error: unknown checks {sorted(unknown)}; known: {[c.name for c in checks]}", file=sys.stderr)
        return 2

    work = tempfile.mkdtemp(prefix="gpu_suite_", dir=args.work_dir)
    ctx = Context(profile, device, work, threads, args.rounds, compile_encoder,
                  jpegs=synthetic_jpegs(profile.unique_jpegs, profile.jpeg_hw))
    setup_s = time.monotonic() - started
    try:
        rows = run_checks(ctx, checks, budget, started, only)
    finally:
        ctx.stop_ray()
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    projection = project({r.spec.name: r for r in rows}, job, profile, args.pretrain_epochs)
    device_name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    report = {
        "meta": {"profile": profile.name, "device": device_name, "torch": torch.__version__, "rounds": args.rounds,
                 "budget_s": budget, "setup_s": setup_s, "elapsed_s": time.monotonic() - started,
                 "threads": threads, "compile": compile_encoder, "job_config": args.job_config,
                 "sizes": profile.describe()},
        "rows": [r.to_json() for r in rows],
        "projection": projection,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_suite.json"), "w") as f:
        json.dump(report, f, indent=2, allow_nan=False)
    print_table(report)
    print(f"\nwritten: {os.path.join(args.out, 'gpu_suite.json')}")
    return 1 if any(r.status == "failed" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
