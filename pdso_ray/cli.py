"""``pdso-ray``: run, pretrain, demo, make-demo-data, make-shards, evaluate, export, segment, export-model,
inspect.

All argument parsing lives here; subcommands call the same library functions as ``jobs/pdso.py``
and tests. Heavy imports happen inside the commands, so that ``pdso-ray --help`` and
``pdso-ray evaluate`` stay light. Every failure is one line on stderr beginning ``error:``
(:func:`describe_error`; ``--debug`` adds the traceback): exit code 2 for a bad input (a config
value, a file, a storage URL, a full disk; also when raised inside a Ray task or a training
worker), 1 for an internal error. Ctrl-C stops the run in every stage (exit 130) and says how to
resume.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

from pdso_ray import __version__
from pdso_ray.config import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO_ROOT / "jobs" / "configs" / "demo.yaml"
PHOTOS_CONFIG = REPO_ROOT / "jobs" / "configs" / "photos.yaml"
EXIT_INTERNAL = 1
# pdso_ray.data.synthetic.WORLDS, spelled out so that `pdso-ray --help` imports nothing heavy
# (tests/test_cli.py checks they agree).
WORLD_CHOICES = ("shapes", "hue")
WORLD_HELP = ("synthetic world: shapes (a class is a shape, a texture and parts, colours are random, "
              "backgrounds are photographs) or hue (each class has its own hue: a colour histogram "
              "separates it; the world the stand-in models know)")
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
VERBOSE_HELP = ("debug logging, and Ray's progress and the workers' output on the terminal (by "
                "default a run shows its own lines, progress bars and warnings; the rest goes to "
                "OUTPUT/logs/)")


def _run(cfg, verbose: bool = False) -> int:
    """Run the pipeline; print the summary, then the warnings. Unless ``verbose``, what Ray and
    the workers write goes to a log file (:func:`pdso_ray.console.quiet_run`), kept in
    ``OUTPUT/logs/`` when the run ends, however it ends."""
    from pdso_ray.console import quiet_run
    from pdso_ray.pipeline import run_pipeline
    from pdso_ray.run_layout import RunLayout

    run = RunLayout.from_config(cfg)
    if verbose:
        summary = run_pipeline(cfg)  # preflight first, then the lease, Ray and the stages
    else:
        # A local file first: the run folder does not exist before the preflight has passed.
        fd, local = tempfile.mkstemp(prefix="pdso-ray-", suffix=".log")
        os.close(fd)
        target = run.log_file(time.strftime("%Y%m%d-%H%M%S", time.gmtime()))
        try:
            with quiet_run(local) as console:
                summary = run_pipeline(cfg, console=console)
        finally:
            _keep_log(local, cfg.output, target)
    print(format_summary(cfg.output, summary, run.report_file("index.html")))
    if not verbose:
        print(f"log (Ray's progress, the workers' output; --verbose shows them here): {target}")
    if summary.get("warnings"):  # last, on stderr: what a person must not miss
        sys.stdout.flush()
        print(format_warnings(summary), file=sys.stderr)
    return 0


def _keep_log(local: str, output: str, target: str) -> None:
    """Copy the run's log file ``local`` to ``target`` in the run folder when the run got as far
    as making that folder (a preflight error leaves none), then remove ``local``."""
    from pdso_ray.storage import Storage

    storage = Storage()
    try:
        if storage.exists(output):
            with open(local, "rb") as f:
                storage.write_bytes(target, f.read())
    except OSError as e:  # the run's own outcome matters more than its log
        print(f"warning: could not keep the log {local} as {target}: {e}", file=sys.stderr)
        return
    os.unlink(local)


def _cmd_run(args: argparse.Namespace) -> int:
    from pdso_ray.config import load_config

    return _run(load_config(args.config, args.set or []), args.verbose)


def _cmd_pretrain(args: argparse.Namespace) -> int:
    """Stage ``pretrain`` of ``--config`` on DATA into OUTPUT, sized to this machine and the data
    (:func:`pdso_ray.stages.pretrain.fit_to_machine`; the keys given with ``--set`` stay as given)."""
    from pdso_ray.config import load_config
    from pdso_ray.preflight import count_train_images, local_machine
    from pdso_ray.stages.pretrain import FITTED_KEYS, fit_to_machine

    overrides = [f"data.root={args.data}", f"output={args.output}", "stages=pretrain"]
    if args.epochs is not None:
        overrides.append(f"pretrain.epochs={args.epochs}")
    cfg = load_config(args.config, [*overrides, *(args.set or [])])
    given = {item.split("=", 1)[0].strip() for item in args.set or []}
    machine = local_machine(cfg)
    if machine is not None and not given.issuperset(FITTED_KEYS):
        # enough images to know whether the configured batch fits on every GPU
        enough = cfg.pretrain.batch_size * max(1, int(machine["GPU"]), cfg.pretrain.num_workers)
        images = count_train_images(cfg, enough)
        memory = None
        if not machine["GPU"] and "pretrain.batch_size" not in given:
            from pdso_ray.models.dino_pretrain import step_memory
            from pdso_ray.stages.pretrain import input_size, pretrain_recipe

            print(f"measuring the memory of a training step of {cfg.models.dino.arch} (seconds to a minute)",
                  flush=True)
            memory = (machine["memory"], *step_memory(pretrain_recipe(cfg, 1), input_size(cfg)))
        try:
            fitted = fit_to_machine(cfg, images, machine["CPU"], int(machine["GPU"]), given, memory)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        for line in fitted:
            print(f"fitted {line}")
    return _run(cfg, args.verbose)


def _cmd_make_demo_data(args: argparse.Namespace) -> int:
    from pdso_ray.data.synthetic import make_demo_dataset

    path = make_demo_dataset(args.out, classes=args.classes, train_per_class=args.train_per_class,
                             val_per_class=args.val_per_class, test_per_class=args.val_per_class,
                             seed=args.seed, world=args.world, style_seed=args.style_seed)
    print(f"demo data written to {path} ({args.world} world)")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    """Synthetic ImageNet-S data + tiny models + the whole pipeline, locally."""
    from pdso_ray.config import load_config
    from pdso_ray.data.synthetic import make_demo_dataset

    workdir = os.path.abspath(args.workdir)
    data_root = os.path.join(workdir, "data")
    cfg = load_config(str(DEMO_CONFIG), [f"data.root={data_root}",
                                         f"output={os.path.join(workdir, 'run')}", *(args.set or [])])
    # the stand-in checkpoints are named relative to the repository: run from anywhere
    for model in (cfg.models.dino, cfg.models.sam):
        if model.checkpoint and "://" not in model.checkpoint and not os.path.isabs(model.checkpoint):
            model.checkpoint = str(REPO_ROOT / model.checkpoint)
    make_demo_dataset(data_root, classes=cfg.data.classes, train_per_class=args.train_per_class,
                      val_per_class=args.val_per_class, test_per_class=args.val_per_class,
                      seed=args.seed, world=args.world)
    print(f"demo data: {data_root}/ImageNetS{cfg.data.classes} ({args.world} world)")
    return _run(cfg, args.verbose)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from pdso_ray.config import DataConfig
    from pdso_ray.data.layouts import build_layout
    from pdso_ray.evaluation import evaluate_dirs, format_result
    from pdso_ray.storage import Storage

    try:
        gt = args.gt
        if args.gt_layout != "folder":  # the ground truth held in a dataset's shards or tables
            storage = Storage()
            layout = build_layout(DataConfig(root=args.gt, classes=args.classes, layout=args.gt_layout), storage)
            gt = layout.gt_dir(storage, args.split)
            if gt is None:
                raise ValueError(f"{args.gt} has no ground truth for split {args.split!r} "
                                 f"(data.layout={args.gt_layout})")
        result = evaluate_dirs(args.pred, gt, args.classes, match_file=args.match,
                               progress=not args.quiet, resize=args.resize, workers=args.workers)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if args.json:
        print(json.dumps(result.to_json(), allow_nan=False))
    else:
        print(format_result(result))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from pdso_ray.export import export_submission
    from pdso_ray.storage import Storage

    try:
        name = args.method or ("PDSO (pdso-ray)" if args.results == "pdso" else "LightCluster (pdso-ray)")
        result = export_submission(Storage(), args.run, args.out, split=args.split, method=name,
                                   description=args.description, link=args.link, results=args.results)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    checked = "" if result.checked_against_dataset else " (not checked against the dataset)"
    print(f"wrote {result.url}: {result.images} predictions{checked}, match.json, method.txt")
    return 0


def _cmd_make_shards(args: argparse.Namespace) -> int:
    from pdso_ray.data.make_shards import make_shards
    from pdso_ray.storage import Storage

    try:
        result = make_shards(Storage(), args.src, args.dst, args.images_per_shard, layout=args.layout,
                             classes=args.classes, folder_is_class=args.folder_is_class,
                             workers=args.workers, progress=not args.quiet)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    print(f"{args.dst}: {result.written} shards written, {result.skipped} already there; "
          f"{result.images} images; {result.rejected} rejected by the listing and "
          f"{len(result.unreadable)} unreadable, not copied (see {args.dst}/.make-shards.json and the log)")
    return 0


def _cmd_segment(args: argparse.Namespace) -> int:
    from pdso_ray.segment import format_segment_summary, segment

    summary = segment(args.model, args.input, args.output, layout=args.layout, overlay=args.overlay,
                      overrides=args.set or [])
    print(format_segment_summary(summary))
    return 0


def _cmd_export_model(args: argparse.Namespace) -> int:
    from pdso_ray.model_export import export_model
    from pdso_ray.storage import Storage

    storage = Storage()
    images = None
    if args.check_images:
        images = _check_images(storage, args.check_images)
    result = export_model(storage, args.run, args.out, method=args.method, onnx=args.onnx, check_images=images)
    config = result.config
    print(f"wrote {args.out}: model.safetensors, config.json, README.md"
          + (", model.onnx" if args.onnx else ""))
    print(f"  {config['arch']} ({config['timm_name']}), C = {config['num_classes']}, output stride "
          f"{config['output_stride']}, backbone licence: {config['backbone_license']}")
    for split, m in config["metrics"].items():
        print(f"  {split} mIoU {m['mIoU']:.2f} on {m['images']} images")
    if result.onnx_max_abs_diff is not None:
        print(f"  ONNX checked with onnxruntime on {config['onnx']['checked_images']} images: "
              f"max abs logit difference {result.onnx_max_abs_diff:.3g}")
    return 0


def _check_images(storage, folder: str, count: int = 4):
    """Up to ``count`` decodable images below ``folder`` (HxWx3 uint8, as stored)."""
    from pdso_ray.data.decode import decode_image
    from pdso_ray.data.listing import list_tree

    images = []
    for record in list_tree(storage, folder, "all", class_folders=False).images:
        decoded = decode_image(storage.read_bytes(record.path), exif_transpose=False)
        if decoded.ok:
            images.append(decoded.image)
        if len(images) == count:
            break
    if not images:
        raise ConfigError(f"--check-images {folder}: no readable image there")
    return images


def _cmd_inspect(args: argparse.Namespace) -> int:
    from pdso_ray.run_layout import RunLayout
    from pdso_ray.plan import METHODS
    from pdso_ray.storage import Storage

    storage = Storage()
    run = RunLayout(args.run, method=args.method)
    if not storage.exists(run.summary_file):
        raise ConfigError(f"no summary.json in {run.method_root}: not a run folder, or no "
                          f"{args.method} stage has finished yet")
    summary = storage.read_json(run.summary_file)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(format_summary(args.run, summary, run.report_file("index.html")))
    if summary.get("warnings"):
        print(format_warnings(summary))
    for other in (m for m in METHODS if m != args.method):
        url = run.for_method(other).summary_file
        if storage.exists(url):
            found = storage.read_json(url)
            miou = f"validation mIoU {found['mIoU']:.2f}" if "mIoU" in found else "not evaluated"
            print(f"also in this folder: {other}, {miou} (pdso-ray inspect {args.run} --method {other})")
    return 0


def format_summary(output: str, summary: dict, report_url: str | None = None) -> str:
    """The run's summary as text: one line per stage of its method in pipeline order, then the
    accounting, the notes and the headline numbers."""
    from pdso_ray.plan import method_stages

    stages = summary.get("stages", {})
    method = summary.get("method", "pdso")
    order = summary.get("stage_order") or method_stages(method)
    lines = [f"run folder: {output} (method: {method})", f"  {'stage':<14} {'status':<11} {'seconds':>9}"]
    for name in [*order, *[s for s in stages if s not in order]]:
        info = stages.get(name)
        if info is None:
            lines.append(f"  {name:<14} {'not run':<11}")
            continue
        seconds = info.get("seconds")
        timing = f"{seconds:9.1f}" if isinstance(seconds, (int, float)) else " " * 9
        lines.append(f"  {name:<14} {info.get('status', '?'):<11} {timing}")
    if "images_total" in summary:
        lines.append(f"images: {summary['images_total']} total, {summary['images_ok']} ok, "
                     f"{summary['images_rejected']} rejected (listed under {output}/rejected/)")
    for split, info in sorted(summary.get("splits", {}).items()):
        lines.append(f"  {split}: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    for stage, notes in summary.get("notes", {}).items():
        lines += [f"note ({stage}): {n}" for n in notes]
    for key, label in (("mIoU", "validation mIoU"), ("mIoU_test", "test mIoU")):
        if key in summary:
            lines.append(f"{label}: {summary[key]:.2f}")
    if stages.get("report") and report_url:
        lines.append(f"report: {report_url}")
    return "\n".join(lines)


def format_warnings(summary: dict) -> str:
    """One ``warning:`` line per sign of a degenerate result (the label-free quality signals of
    the report stage, docs/method.md), each naming its likely cause and the fix; empty if none."""
    return "\n".join(f"warning: {w}" for w in summary.get("warnings", []))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pdso-ray", description="Unsupervised semantic segmentation at ImageNet scale on Ray "
        "(PDSO: pseudo-label denoising and SAM optimisation).")
    parser.add_argument("--version", action="version", version=f"pdso-ray {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback of an error (by default an error is one line)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the pipeline from a YAML config",
                       description="Run the pipeline (or some stages) from a YAML config; a re-run "
                       "of the same command resumes where it stopped.")
    p.add_argument("config", help="YAML config (see jobs/configs/)")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value, e.g. --set stages=features,cluster (repeatable)")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("pretrain", help="pretrain DINO on your images (one machine, sized to it)",
                       description="Run stage `pretrain` of a config on the images under DATA, into the "
                       "run folder OUTPUT, with the workers, CPUs, GPU use and batch size fitted to this "
                       "machine and the number of images (a key given with --set stays as given). The "
                       "teacher is written after every epoch to OUTPUT/pretrain/dino_teacher.pth; "
                       "re-running resumes. Then `pdso-ray run CONFIG --set output=OUTPUT ...` without "
                       "models.dino.checkpoint uses it.")
    p.add_argument("data", help="folder or URL of the images (any tree; data.layout of the config)")
    p.add_argument("output", help="run folder (or URL); the pipeline run after it uses the same one")
    p.add_argument("--config", default=str(PHOTOS_CONFIG),
                   help="YAML config whose models.dino and pretrain sections are used (default: "
                   "jobs/configs/photos.yaml, DINO's ViT-S/8 recipe)")
    p.add_argument("--epochs", type=int, default=None, help="pretrain.epochs (default: the config's)")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value, e.g. --set pretrain.batch_size=32 (repeatable); "
                   "--set stages=pretrain,features,... runs more stages")
    p.set_defaults(func=_cmd_pretrain)

    p = sub.add_parser("demo", help="synthetic data + tiny models + the whole pipeline, locally",
                       description="Write a small synthetic ImageNet-S dataset and run the whole "
                       "pipeline on it with jobs/configs/demo.yaml.")
    p.add_argument("--workdir", default="demo", help="where data/ and run/ go (default: demo)")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    p.add_argument("--train-per-class", type=int, default=40, help="train images per class (default 40)")
    p.add_argument("--val-per-class", type=int, default=6,
                   help="validation and test images per class (default 6)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic images (default 0)")
    # hue until a stand-in DINO learns shape: on the shapes world today's stand-in clusters at
    # chance (README, "The synthetic worlds"), so the demo would only show that.
    p.add_argument("--world", default="hue", choices=WORLD_CHOICES, help=WORLD_HELP + " (default: hue)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value of jobs/configs/demo.yaml (repeatable)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("make-demo-data", help="write a small synthetic ImageNet-S dataset",
                       description="Write OUT/ImageNetS{N}/ with train, validation and test images "
                       "and validation/test ground truth.")
    p.add_argument("out", help="folder that will hold ImageNetS{N}/")
    p.add_argument("--classes", type=int, default=5, help="number of classes N (default 5)")
    p.add_argument("--train-per-class", type=int, default=20, help="train images per class (default 20)")
    p.add_argument("--val-per-class", type=int, default=4,
                   help="validation and test images per class (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the images (default 0)")
    p.add_argument("--world", default="shapes", choices=WORLD_CHOICES, help=WORLD_HELP + " (default: shapes)")
    p.add_argument("--style-seed", type=int, default=None,
                   help="which classes: another seed draws another class set (default: the demo's)")
    p.set_defaults(func=_cmd_make_demo_data)

    p = sub.add_parser("evaluate", help="official ImageNet-S mIoU of a prediction folder",
                       description="Evaluate predicted label PNGs against ImageNet-S ground truth "
                       "with the official protocol (Hungarian matching, C+1 classes).")
    p.add_argument("--pred", required=True,
                   help="folder (or URL) of predicted label PNGs, or of PNG shards (output_format=webdataset)")
    p.add_argument("--gt", required=True, help="folder (or URL) of ground-truth label PNGs; with --gt-layout, "
                   "the root of a dataset whose shards or tables hold the ground truth")
    p.add_argument("--gt-layout", default="folder", choices=["folder", "webdataset", "parquet"],
                   help="folder (default): --gt holds PNGs; webdataset / parquet: --gt is a data.root of that "
                   "layout and its seg.png members / seg column of --split are the ground truth")
    p.add_argument("--split", default="validation", help="with --gt-layout: which split (default validation)")
    p.add_argument("--classes", required=True, type=int, help="number of classes C")
    p.add_argument("--match", default=None,
                   help="matching JSON: reused if it exists, else computed and written")
    p.add_argument("--resize", default=None, choices=["nearest"],
                   help="resize predictions whose size differs from their GT "
                        "(default: such a prediction is an error)")
    p.add_argument("--workers", type=int, default=8, help="threads reading PNGs (default 8)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON line {mIoU, IoU, match, ...} instead of a table")
    p.add_argument("--quiet", action="store_true", help="no progress bar (on stderr)")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("export", help="zip test predictions for the ImageNet-S benchmark server",
                       description="Pack a run's predictions, match.json and method.txt in the "
                       "layout of the ImageNet-S evaluation server.")
    p.add_argument("run", help="run folder (or URL) after the predict and evaluate stages")
    p.add_argument("out", help="zip file to write (path or URL), e.g. test.zip")
    p.add_argument("--split", default="test", choices=["test", "validation"],
                   help="which predictions to pack (default: test)")
    p.add_argument("--results", default="pdso", choices=["pdso", "lightcluster"],
                   help="whose predictions to pack: PDSO's (the run folder's top) or LightCluster's "
                   "(its lightcluster/ folder); default pdso")
    p.add_argument("--method", default=None,
                   help="method name in method.txt (default: PDSO (pdso-ray) or LightCluster (pdso-ray))")
    p.add_argument("--description", default="null", help="method description in method.txt")
    p.add_argument("--link", default="null", help="paper/project link in method.txt")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("make-shards", help="convert a folder, ImageNet-S tree or table into WebDataset shards",
                       description="Write SRC's images as WebDataset tar shards under DST (any fsspec "
                       "URL on both sides), for data.layout=webdataset: DST/<split>/NNNNNN.tar with "
                       "the image, its class (cls) and its ground truth (seg.png). Resumable: a "
                       "re-run writes only the missing shards.")
    p.add_argument("src", help="source: an ImageNet-S tree (or its ImageNetS{C} folder), a folder of "
                   "images, Parquet tables or shards")
    p.add_argument("dst", help="folder (or URL) for the shards")
    p.add_argument("--images-per-shard", type=int, default=1000, help="images per shard (default 1000)")
    p.add_argument("--layout", default="auto", choices=["auto", "imagenet_s", "folder", "webdataset", "parquet"],
                   help="how to read SRC (default auto: an ImageNet-S tree when SRC holds ImageNetS{C}, "
                   "else a folder)")
    p.add_argument("--classes", type=int, default=None, help="C of ImageNetS{C} when SRC holds several")
    p.add_argument("--folder-is-class", action="store_true",
                   help="folder source: the first folder below SRC is each image's class (written as cls)")
    p.add_argument("--workers", type=int, default=8, help="shards written at once (default 8)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (on stderr)")
    p.set_defaults(func=_cmd_make_shards)

    p = sub.add_parser("segment", help="segment new images with a trained model",
                       description="Label every image of INPUT with MODEL: a label PNG per image at its "
                       "own size (ImageNet-S codec: id = R + 256*G, 0 background) under "
                       "OUTPUT/predictions/<split>/, on a Ray Data actor pool (GPU when present); a "
                       "re-run skips the images already labelled.")
    p.add_argument("model", help="a run folder (its finetune/model.pt) or a folder written by export-model")
    p.add_argument("input", help="folder or URL of images (any tree), or a dataset in another --layout")
    p.add_argument("output", help="folder or URL for the labels (OUTPUT/predictions/<split>/<rel>.png)")
    p.add_argument("--layout", default="folder",
                   help="how INPUT is laid out: a data.layout (default folder: every image below INPUT, "
                   "split 'all'; imagenet_s: INPUT holds ImageNetS{C}/, its data.eval_splits)")
    p.add_argument("--overlay", action="store_true",
                   help="also write the previews of every prediction: a colour PNG "
                        "(OUTPUT/predictions/<split>_colour/) and an overlay JPEG (<split>_overlay/)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a config value: predict.batch_size, predict.max_actors, ray.address, "
                   "storage.s3.*, data.* of the layout (repeatable)")
    p.set_defaults(func=_cmd_segment)

    p = sub.add_parser("export-model", help="export a run's model: safetensors, config.json, a model card",
                       description="Write RUN's fine-tuned model to the folder OUT in the Hugging Face "
                       "layout: model.safetensors, config.json (architecture, input size and "
                       "normalisation, output stride, background id, the cluster->class match) and a "
                       "model card README.md (data, method, metrics, the backbone's licence); "
                       "`pdso-ray segment OUT ...` uses it.")
    p.add_argument("run", help="run folder (or URL) after the finetune stage")
    p.add_argument("out", help="folder (or URL) to write")
    p.add_argument("--method", default=None, choices=["pdso", "lightcluster"],
                   help="whose model (default: PDSO's, else LightCluster's)")
    p.add_argument("--onnx", action="store_true",
                   help="also write model.onnx (dynamic batch/height/width), checked against torch with "
                   "onnxruntime on real images (needs the onnx extra)")
    p.add_argument("--check-images", default=None, metavar="DIR",
                   help="images for the ONNX check (default: the run's own images)")
    p.set_defaults(func=_cmd_export_model)

    p = sub.add_parser("inspect", help="print a run's summary (stages in pipeline order)",
                       description="Print a run folder's summary.json as a table.")
    p.add_argument("run", help="run folder (the config's `output`)")
    p.add_argument("--method", default="pdso", choices=["pdso", "lightcluster"],
                   help="whose summary to print (default pdso; the other is named when present)")
    p.add_argument("--json", action="store_true", help="print summary.json as it is")
    p.set_defaults(func=_cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        code = args.func(args)
        sys.stdout.flush()  # here, so that a closed pipe (`| head`) is caught below
        return code
    except KeyboardInterrupt:
        _shutdown_ray()
        print("interrupted: re-run the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of our output went away (`pdso-ray inspect RUN --json | head`): nothing to say.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # noqa: BLE001 - every error ends in one line (a traceback with --debug)
        if args.debug:
            traceback.print_exc()
        message, code = describe_error(e)
        hint = "" if code == EXIT_BAD_INPUT or args.debug else " (pdso-ray --debug ... prints the traceback)"
        print(f"error: {message}{hint}", file=sys.stderr)
        return code


# Attributes through which Ray wraps the error it carries (a task's cause, a training worker's).
_WRAPPED = ("cause", "controller_failure")


def describe_error(error: BaseException) -> tuple[str, int]:
    """The one line the CLI prints for ``error``, and the exit code.

    Errors raised inside Ray tasks, actors and training workers reach the driver wrapped (in
    ``RayTaskError``, Ray Data's ``UserCodeException``, Ray Train's ``TrainingFailedError``):
    the error is unwrapped to the first one that is not Ray's own. A bad input — the project's
    own error types, ``ValueError``, ``OSError`` (a storage failure naming its URL, a full disk, a
    missing file) — is exit code 2; anything else is an internal error, exit code 1."""
    cause = _unwrap(error)
    text = " ".join(str(cause).split()) or type(cause).__name__
    if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
        return f"disk full: {text}", EXIT_BAD_INPUT
    if isinstance(cause, (ValueError, OSError)) or type(cause).__module__.split(".")[0] == "pdso_ray":
        return text, EXIT_BAD_INPUT
    where = f" in {_raised_in(cause)}" if _raised_in(cause) not in (None, "pdso_ray") else ""
    return f"internal error{where}: {type(cause).__name__}: {text}", EXIT_INTERNAL


def _raised_in(error: BaseException) -> str | None:
    """The top-level package whose code raised ``error`` (``"ray"`` when Ray failed to start, say)."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return None
    path = Path(frames[-1].filename).parts
    return next((p for p in ("pdso_ray", "ray", "torch", "pyarrow") if p in path), None)


def _unwrap(error: BaseException) -> BaseException:
    """The first error in ``error``'s chain of causes that is not one of Ray's wrappers (module
    docstring of :func:`describe_error`); ``error`` itself when there is none."""
    queue, seen = [error], set()
    while queue:
        e = queue.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        if type(e).__module__.split(".")[0] != "ray":
            return e
        inner = [getattr(e, name, None) for name in _WRAPPED]
        inner += list((getattr(e, "worker_failures", None) or {}).values())
        queue += [x for x in (*inner, e.__cause__, e.__context__) if isinstance(x, BaseException)]
    return error


def _shutdown_ray() -> None:
    """Stop the Ray instance this process started or joined (workers of a local instance end
    with it); nothing if Ray was never imported."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
