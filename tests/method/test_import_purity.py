"""Every module of ``pdso_ray.method`` is pure: it imports neither Ray nor fsspec (nor the storage
seam or timm), and the numpy-only ones do not pull in torch (CPU shard actors and the purify
driver skip its start-up time and memory). Modules are found automatically: a new one is checked
without editing this file."""

import json
import pkgutil
import subprocess
import sys

import pdso_ray.method

MODULES = sorted(m.name for m in pkgutil.iter_modules(pdso_ray.method.__path__))
FORBIDDEN_PACKAGES = ("ray", "fsspec", "s3fs", "timm")
FORBIDDEN_MODULES = ("pdso_ray.storage",)
TORCH_FREE = {"kmeans_math", "metrics", "selection", "purify", "cluster_metrics"}


def test_every_method_module_is_pure():
    assert {"denoise", "purify", "kmeans_math", "metrics", "refiners"} <= set(MODULES)
    # One fresh interpreter per module (imports must not hide each other), all at once.
    procs = {name: subprocess.Popen(
        [sys.executable, "-c", f"import sys, json, pdso_ray.method.{name}; print(json.dumps(sorted(sys.modules)))"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in MODULES}
    problems = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"pdso_ray.method.{name} does not import: {err[-500:]}"
        loaded = set(json.loads(out))
        bad = sorted(m for m in loaded if m.split(".")[0] in FORBIDDEN_PACKAGES or m in FORBIDDEN_MODULES)
        if name in TORCH_FREE and "torch" in loaded:
            bad.append("torch")
        if bad:
            problems[name] = bad
    assert problems == {}
