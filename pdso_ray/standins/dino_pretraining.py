"""The DINO stand-in: pretrain a tiny ViT with the ``pretrain`` stage on synthetic data that the
demo never shows, and ship its teacher.

``python -m pdso_ray.standins.dino_pretraining --out pdso_ray/standins/assets/dino_tiny.pth
[--work runs/standin_pretrain]`` writes the training data (:data:`PRETRAIN_DATA`: 64 classes whose
appearance is drawn from a style seed, so none is a demo class, at another image seed), runs
``jobs/configs/standin_pretrain.yaml`` (stage ``pretrain`` alone) under ``--work`` and copies
``pretrain/dino_teacher.pth``, the official DINO layout, to ``--out``. Re-running resumes an
interrupted pretraining; the recipe is :class:`pdso_ray.models.dino_pretrain.DinoPretrainConfig`'s
defaults.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil

from pdso_ray.cli import REPO_ROOT

CONFIG = os.path.join(REPO_ROOT, "jobs", "configs", "standin_pretrain.yaml")
# make_demo_dataset arguments of the training data: other classes (style_seed) and another image
# seed than every demo and test set.
PRETRAIN_DATA = dict(classes=64, train_per_class=40, val_per_class=0, test_per_class=0, image_size=(96, 128),
                     seed=777, style_seed=4242)


def main(argv: list[str] | None = None) -> None:
    from pdso_ray.config import load_config
    from pdso_ray.data.synthetic import make_demo_dataset
    from pdso_ray.pipeline import run_pipeline
    from pdso_ray.run_layout import RunLayout

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="where to write the teacher checkpoint")
    parser.add_argument("--work", default="runs/standin_pretrain", help="folder for the data and the run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    work = os.path.abspath(args.work)
    data = os.path.join(work, "data")
    make_demo_dataset(data, **PRETRAIN_DATA)
    cfg = load_config(CONFIG, [f"output={os.path.join(work, 'run')}", f"data.root={data}"])
    summary = run_pipeline(cfg)
    final = summary["diagnostics"]["pretrain"]["history"][-1]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    shutil.copyfile(RunLayout.from_config(cfg).pretrain_teacher, args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes); last epoch: {final}")


if __name__ == "__main__":
    main()
