"""benchmarks/lightcluster_scale.py in its ``--smoke`` mode (a subprocess with its own local Ray):
the stage's dataset, category and labelling steps run on synthetic data, the JSON holds a timing
row and memory peaks per phase, and the fitted levels find the synthetic foreground."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PHASES = ("dataset", "category", "labelling", "labelling_driver")


def test_smoke_run_measures_every_phase_and_finds_the_foreground(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "lightcluster_scale.py"), "--smoke",
                           "--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (url,) = glob.glob(str(tmp_path / "results" / "*.json"))
    result = json.load(open(url))
    assert "aborted" not in result
    assert result["data"] == {"n": 1000, "ppi": 4, "d": 384, "classes": 8, "seed": 0, "images_per_file": 16}
    # the stage's groupby: one partition per sample file (63 of 16 images), at most C
    assert result["shuffle_partitions"] == 8 and result["variant"] == "stage"
    for phase in PHASES:
        assert result["phases"][phase] > 0, phase
        memory = result["memory"][phase]
        assert memory["driver"] > 100 * 2**20, phase  # a Python driver with Ray holds > 100 MiB
        assert memory["tree"] > memory["driver"] / 2, phase  # PSS of the driver and its Ray processes
    # the k-means rows: every sample row (4 per image) and every train image assigned
    assert result["kmeans"]["dataset"]["rows"] == 4000 and result["kmeans"]["dataset"]["k"] == 2
    assert result["kmeans"]["labelling"]["rows"] == 1000 and result["kmeans"]["labelling"]["k"] == 8
    assert result["kmeans"]["labelling"]["redos"] == 2 and result["kmeans"]["labelling"]["steps"] >= 2
    sanity = result["sanity"]
    assert sanity["dataset_fg_accuracy"] > 0.9 and sanity["category_fg_accuracy"] > 0.9
    assert 0.3 < sanity["fg_share"] < 0.5  # foreground share uniform in [0.2, 0.6] per image
    assert sanity["labelling_purity"] > 0.8  # 8 well-separated classes
    # 1000 train images + 1000 * 39,842 / 1,281,167 = 31 evaluation images, each given a class or -1
    assert sanity["classes_assigned"] == 1031
    pieces = result["segment"]["pieces"]
    assert all(v["wall"] > 0 for v in pieces.values()) and len(pieces) == 9
