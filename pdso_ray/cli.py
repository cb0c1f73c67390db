"""``pdso-ray``: demo, run, make-demo-data, evaluate, inspect.

Subcommands call the same functions as ``jobs/pdso.py``; heavy imports happen inside them so that
``pdso-ray --help`` and ``pdso-ray evaluate`` stay light.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from pdso_ray.config import ConfigError

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "jobs" / "configs" / "demo.yaml"


def _cmd_run(args: argparse.Namespace) -> int:
    from pdso_ray.config import load_config
    from pdso_ray.pipeline import run_pipeline

    cfg = load_config(args.config, args.set or [])
    summary = run_pipeline(cfg)
    _print_summary(cfg.output, summary)
    return 0


def _cmd_make_demo_data(args: argparse.Namespace) -> int:
    from pdso_ray.data.synthetic import make_demo_dataset

    path = make_demo_dataset(args.out, classes=args.classes, train_per_class=args.train_per_class,
                             val_per_class=args.val_per_class, test_per_class=args.val_per_class,
                             seed=args.seed)
    print(f"demo data written to {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    """Synthetic ImageNet-S data + tiny random-init models + the whole pipeline, locally."""
    from pdso_ray.config import load_config
    from pdso_ray.data.synthetic import make_demo_dataset
    from pdso_ray.pipeline import run_pipeline

    workdir = os.path.abspath(args.workdir)
    data_root = os.path.join(workdir, "data")
    cfg = load_config(str(DEMO_CONFIG), [f"data.root={data_root}",
                                         f"output={os.path.join(workdir, 'run')}", *(args.set or [])])
    if not os.path.isdir(os.path.join(data_root, f"ImageNetS{cfg.data.classes}")):
        make_demo_dataset(data_root, classes=cfg.data.classes, train_per_class=args.train_per_class,
                          val_per_class=args.val_per_class, test_per_class=args.val_per_class,
                          seed=args.seed)
    print(f"demo data: {data_root}/ImageNetS{cfg.data.classes}")
    summary = run_pipeline(cfg)
    _print_summary(cfg.output, summary)
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from pdso_ray.storage import Storage

    storage = Storage()
    url = storage.join(args.run, "summary.json")
    if not storage.exists(url):
        print(f"no summary.json in {args.run}", file=sys.stderr)
        return 2
    print(json.dumps(storage.read_json(url), indent=2))
    return 0


def _print_summary(output: str, summary: dict) -> None:
    print(f"run folder: {output}")
    for name, info in summary.get("stages", {}).items():
        seconds = info.get("seconds")
        timing = f"{seconds:8.1f} s" if isinstance(seconds, (int, float)) else " " * 10
        print(f"  {name:<14} {info.get('status', '?'):<8} {timing}")
    if "images_total" in summary:
        print(f"images: {summary['images_total']} total, {summary['images_ok']} ok, "
              f"{summary['images_rejected']} rejected (listed under {output}/rejected/)")
    if "mIoU" in summary:
        print(f"mIoU: {summary['mIoU']:.2f}")
    report = f"{output}/report/index.html"
    if summary.get("stages", {}).get("report"):
        print(f"report: {report}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdso-ray", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the pipeline from a YAML config")
    p.add_argument("config", help="YAML config (see jobs/configs/)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value, e.g. --set stages=features,cluster")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("demo", help="synthetic data + tiny models + whole pipeline, locally")
    p.add_argument("--workdir", default="demo", help="where data and the run folder go")
    p.add_argument("--train-per-class", type=int, default=40)
    p.add_argument("--val-per-class", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("make-demo-data", help="write a small synthetic ImageNet-S dataset")
    p.add_argument("out", help="folder that will hold ImageNetS{N}/")
    p.add_argument("--classes", type=int, default=5)
    p.add_argument("--train-per-class", type=int, default=20)
    p.add_argument("--val-per-class", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_make_demo_data)

    from pdso_ray.evaluation import add_evaluate_arguments, run_evaluate_command

    p = sub.add_parser("evaluate", help="official ImageNet-S mIoU of a prediction folder")
    add_evaluate_arguments(p)
    p.set_defaults(func=run_evaluate_command)

    from pdso_ray.export import add_export_arguments, run_export_command

    p = sub.add_parser("export", help="zip test predictions for the ImageNet-S benchmark server")
    add_export_arguments(p)
    p.set_defaults(func=run_export_command)

    p = sub.add_parser("inspect", help="print a run's summary.json")
    p.add_argument("run", help="run folder (the config's `output`)")
    p.set_defaults(func=_cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
