"""Entry point for `ray job submit`:

    ray job submit --working-dir . -- python jobs/pdso.py --config jobs/configs/imagenet_s919.yaml \
        [--set key=value ...]

Runs the same code as `pdso-ray run`; connects to the cluster the job was submitted to.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pdso_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
    args = parser.parse_args()
    argv = ["--debug"] * args.debug + ["run", args.config]
    for item in args.set:
        argv += ["--set", item]
    sys.exit(main(argv))
