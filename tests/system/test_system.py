"""System tests: the pipeline the way users run it.

- ``ray job submit`` of ``jobs/pdso.py`` to a running head (started here with ``ray start``), the
  repo uploaded as the job's working dir;
- a driver killed (SIGKILL) in the middle of a stage, then re-run: finished stages are skipped, the
  interrupted one completes, every image is accounted for exactly once;
- the shipped real-run configs (``jobs/configs/imagenet_s*.yaml``) and ``cluster.yaml`` checked
  against the pipeline's schema, Ray's autoscaler schema and EC2's API model, and against each other.

Ray Train's own crash-and-resume is covered by tests/test_finetune.py. Every Ray started here keeps
its files under its own short temp dir, and only the processes under that dir are stopped.
"""

from __future__ import annotations

import copy
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from pdso_ray.config import load_config
from pdso_ray.data.imagenet_s import list_split
from pdso_ray.data.synthetic import make_demo_dataset
from pdso_ray.storage import Storage
from pdso_ray.tables import read_folder

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's python, ray and pdso-ray
CLASSES = 3
PER_CLASS = 4
STAGES_1_4 = ("features", "cluster", "denoise", "purify")
# Not uploaded with a job: the venv alone is gigabytes (Ray also honours .gitignore).
JOB_EXCLUDES = [".venv", ".git", "demo", "runs", "*.egg-info", "**/__pycache__", ".pytest_cache"]
PUBLISHED_THRESHOLDS = {50: 0.41, 300: 0.40, 919: 0.37}


# ---- helpers ----------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s") from None
            time.sleep(0.5)


def _ray_temp_dir() -> str:
    # Short on purpose: Ray's unix socket paths (temp dir + session name + "sockets/...") must fit
    # in 107 bytes, which pytest's tmp_path does not leave room for.
    return tempfile.mkdtemp(prefix="pdso-ray-", dir="/tmp")


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _processes_under(temp_dir: str) -> list[int]:
    """PIDs of the Ray started with ``temp_dir``: processes naming it on their command line or
    running inside it (job drivers, actors with a working dir), and all their descendants (workers
    retitle themselves ``ray::...``, so only their parent links them to this Ray)."""
    marker = os.path.join(temp_dir, "").encode()  # trailing slash: /tmp/x never matches /tmp/xy
    parent: dict[int, int] = {}
    roots = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        stat = _read(f"/proc/{pid}/stat")
        if not stat:
            continue
        parent[pid] = int(stat.rsplit(b")", 1)[1].split()[1])
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd").encode()
        except OSError:
            cwd = b""
        if marker in _read(f"/proc/{pid}/cmdline") or cwd.startswith(marker):
            roots.add(pid)
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += children.get(pid, [])
    found.discard(os.getpid())
    return sorted(found)


def _stop_ray(temp_dir: str, grace: float = 5.0) -> None:
    """Stop the Ray under ``temp_dir`` (and nothing else: `ray stop` would stop every Ray on the
    machine): SIGTERM, then SIGKILL what is left after ``grace`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _processes_under(temp_dir)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            time.sleep(0.2)
            pids = _processes_under(temp_dir)
        if not pids:
            return


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env.update(extra)
    return env


def _tiny_dataset(tmp_path: Path) -> str:
    root = str(tmp_path / "data")
    make_demo_dataset(root, classes=CLASSES, train_per_class=PER_CLASS, val_per_class=1,
                      test_per_class=1)
    return root


def _overrides(root: str, output: Path, *extra: str) -> list[str]:
    args = []
    for item in (f"data.root={root}", f"output={output}", f"data.classes={CLASSES}",
                 "features.batch_size=4", "purify.topk=2", *extra):
        args += ["--set", item]
    return args


def _ids(storage: Storage, folder: str) -> list[str]:
    if not storage.exists(folder):
        return []
    return read_folder(storage, folder, columns=["id"]).column("id").to_pylist()


# ---- ray job submit ---------------------------------------------------------------------------------
def test_ray_job_submit_runs_the_pipeline_on_a_running_head(tmp_path):
    root = _tiny_dataset(tmp_path)
    output = tmp_path / "run"
    ray_dir = _ray_temp_dir()
    gcs_port, dashboard_port = _free_port(), _free_port()
    # Token auth as on the cluster, with a token of this test's own (not ~/.ray/auth_token).
    env = _env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    stages = ("features", "cluster")
    try:
        start = subprocess.run(
            [str(BIN / "ray"), "start", "--head", f"--port={gcs_port}", "--num-cpus=2",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
             "--include-dashboard=true", f"--temp-dir={ray_dir}", "--disable-usage-stats",
             # ports with fixed defaults, so that another Ray on this machine cannot collide
             f"--ray-client-server-port={_free_port()}",
             f"--dashboard-agent-listen-port={_free_port()}"],
            env=env, capture_output=True, text=True, timeout=180)
        assert start.returncode == 0, start.stdout + start.stderr
        _wait_for_port(dashboard_port, timeout=60)
        submit = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dashboard_port}",
             "--working-dir", str(REPO), "--runtime-env-json", json.dumps({"excludes": JOB_EXCLUDES}),
             "--", "python", "jobs/pdso.py", "--config", "jobs/configs/demo.yaml",
             # demo.yaml sets ray.num_cpus=2: inside a job the submitted cluster wins anyway
             *_overrides(root, output, f"stages={','.join(stages)}")],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=420)
        log = submit.stdout + submit.stderr
        assert submit.returncode == 0, log[-4000:]
        assert re.search(r"Job 'raysubmit_\w+' succeeded", log), log[-4000:]
        # the driver joined this head rather than starting a Ray of its own (Ray's own lines are in
        # the run's log file, pdso-ray's on the job's terminal)
        assert "running inside a Ray job: using its cluster" in log, log[-4000:]
        (ray_log,) = (output / "logs").glob("run-*.log")
        assert re.search(rf"Connecting to existing Ray cluster at address: \S+:{gcs_port}\b",
                         ray_log.read_text()), log[-4000:]
    finally:
        _stop_ray(ray_dir)
        shutil.rmtree(ray_dir, ignore_errors=True)
    assert _processes_under(ray_dir) == []

    summary = json.loads((output / "summary.json").read_text())
    n = CLASSES * PER_CLASS
    assert (summary["images_total"], summary["images_ok"], summary["images_rejected"]) == (n, n, 0)
    for stage in stages:
        assert summary["stages"][stage]["status"] == "done"
        manifest = json.loads((output / stage / "_SUCCESS.json").read_text())
        assert manifest["stage"] == stage
    assert summary["stages"]["cluster"]["counts"]["images"] == n
    storage = Storage()
    ids = _ids(storage, str(output / "features"))
    assert len(ids) == len(set(ids)) == n
    assert sorted(_ids(storage, str(output / "cluster"))) == sorted(ids)


# ---- killed driver ----------------------------------------------------------------------------------
@pytest.mark.slow  # two pipeline runs of ~40 s each on 2 cores
def test_killed_driver_resumes_and_accounts_for_every_image_once(tmp_path):
    root = _tiny_dataset(tmp_path)
    output = tmp_path / "run"
    ray_dir = _ray_temp_dir()
    # demo.yaml keeps ray.num_cpus=2: each run starts its own local Ray, under RAY_TMPDIR.
    env = _env(RAY_TMPDIR=ray_dir)
    cmd = [sys.executable, "-m", "pdso_ray.cli", "run", "jobs/configs/demo.yaml",
           *_overrides(root, output, f"stages={','.join(STAGES_1_4)}")]
    cluster_started = output / "cluster" / "_STARTED.json"
    first_log = tmp_path / "first.log"
    driver = None
    try:
        with open(first_log, "wb") as log:
            driver = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 300
            while not cluster_started.exists():
                assert driver.poll() is None, first_log.read_text()[-4000:]
                assert time.monotonic() < deadline, "stage cluster never started"
                time.sleep(0.1)
            driver.kill()
            driver.wait()
        finished_at_kill = {s for s in STAGES_1_4 if (output / s / "_SUCCESS.json").exists()}
        assert finished_at_kill == {"features"}, first_log.read_text()[-4000:]
        _stop_ray(ray_dir)  # whatever the dead driver's local Ray left running

        second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
        log2 = second.stdout + second.stderr
        assert second.returncode == 0, log2[-4000:]
        assert "stage cluster: resuming an interrupted run" in log2
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
            driver.wait()
        _stop_ray(ray_dir)
        shutil.rmtree(ray_dir, ignore_errors=True)

    summary = json.loads((output / "summary.json").read_text())
    statuses = {s: summary["stages"][s]["status"] for s in STAGES_1_4}
    assert statuses == {"features": "skipped", "cluster": "done", "denoise": "done", "purify": "done"}
    storage = Storage()
    listed = sorted(r.id for r in list_split(storage, root, CLASSES, "train").images)
    assert len(listed) == CLASSES * PER_CLASS
    features = _ids(storage, str(output / "features"))
    rejected = _ids(storage, str(output / "rejected"))
    # exactly once: no id twice, none in both places, none missing
    assert len(features) == len(set(features)) and not set(features) & set(rejected)
    assert sorted(features + rejected) == listed
    assert summary["images_total"] == len(listed)
    assert summary["images_total"] == summary["images_ok"] + summary["images_rejected"]
    assert (summary["images_ok"], summary["images_rejected"]) == (len(features), len(rejected))
    for stage in ("cluster", "purify"):
        assert sorted(_ids(storage, str(output / stage))) == sorted(features), stage


# ---- shipped configs --------------------------------------------------------------------------------
def _cluster_config() -> dict:
    with open(REPO / "cluster.yaml", encoding="utf-8") as f:
        return yaml.safe_load(f)


def _max_cluster_gpus(cluster: dict) -> int:
    return sum(int(t["resources"].get("GPU", 0)) * t.get("max_workers", 0)
               for t in cluster["available_node_types"].values())


@pytest.mark.parametrize("classes", sorted(PUBLISHED_THRESHOLDS))
def test_imagenet_job_configs_load_and_fit_the_cluster(classes):
    from pdso_ray.models.dino import DINO_SPECS
    from pdso_ray.models.sam import SAM_REGISTRY

    path = REPO / "jobs" / "configs" / f"imagenet_s{classes}.yaml"
    cfg = load_config(str(path))  # unknown keys or wrong types raise ConfigError naming the key
    assert cfg.data.classes == classes
    assert cfg.stages is None  # every stage
    # t and sigma are swept on validation; PASS's value is only the fallback without ground truth
    assert cfg.pseudo_labels.threshold is None and cfg.pseudo_labels.refine.sigma is None
    assert cfg.saliency_threshold() == PUBLISHED_THRESHOLDS[classes]
    # real weights, never random ones; architectures the registries know
    assert cfg.models.allow_random_init is False
    assert (cfg.models.dino.arch, cfg.models.sam.arch) == ("vit_small_patch8", "vit_b")
    assert cfg.models.dino.arch in DINO_SPECS and cfg.models.sam.arch in SAM_REGISTRY
    assert cfg.models.dino.checkpoint.endswith("/dino_deitsmall8_pretrain.pth")
    assert cfg.models.sam.checkpoint.endswith("/sam_vit_b_01ec64.pth")
    for url in (cfg.data.root, cfg.output, cfg.models.dino.checkpoint, cfg.models.sam.checkpoint):
        assert url.startswith("s3://"), url
    # docs/method.md hyperparameters
    assert (cfg.cluster.niter, cfg.denoise.keep_ratio, cfg.denoise.epochs_f, cfg.denoise.epochs_g,
            cfg.denoise.epochs_h) == (20, 0.5, 15, 50, 50)
    assert (cfg.purify.dist_quantile, cfg.purify.alpha, cfg.purify.topk) == (0.8, 2.0, 50)
    assert cfg.pseudo_labels.refine.method == "spo"
    assert (cfg.finetune.epochs, cfg.predict.short_side) == (20, 256)
    assert cfg.features.batch_size >= 128  # docs/architecture.md, "Speed": keep the GPU fed
    # inside `ray job submit` the driver must join the job's cluster, not start a local Ray
    assert cfg.ray.address is None and cfg.ray.num_cpus is None and cfg.ray.use_gpu is True
    # every GPU pool fits the cluster's largest size
    gpus = _max_cluster_gpus(_cluster_config())
    assert cfg.features.max_actors * cfg.features.gpus_per_actor <= gpus
    assert cfg.pseudo_labels.max_actors * cfg.pseudo_labels.gpus_per_actor <= gpus
    assert cfg.predict.max_actors * cfg.predict.gpus_per_actor <= gpus
    assert cfg.finetune.use_gpu and cfg.finetune.num_workers <= gpus
    # the README's submit command overrides the placeholders
    cfg = load_config(str(path), ["data.root=s3://bkt/imagenet-s", "output=s3://bkt/runs/x"])
    assert (cfg.data.root, cfg.output) == ("s3://bkt/imagenet-s", "s3://bkt/runs/x")


def test_cluster_yaml_passes_ray_up_validation_and_the_ec2_api_model():
    import botocore.session
    from botocore.validate import validate_parameters
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _cluster_config()
    # what `ray up` does before it contacts AWS: merge the provider defaults, then the JSON schema
    # (ray/autoscaler/ray-schema.json) and the cross-field checks
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    assert config["provider"]["type"] == "aws"
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # no tasks on the head
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
    assert gpu_types and all(t["max_workers"] > t["min_workers"] for t in gpu_types)
    # Ray passes node_config to EC2 RunInstances as is: check names and types against its model
    run_instances = botocore.session.get_session().get_service_model("ec2") \
        .operation_model("RunInstances").input_shape
    for name, node_type in types.items():
        node_config = node_type["node_config"]
        validate_parameters({**node_config, "MinCount": 1, "MaxCount": 1}, run_instances)
        assert node_config["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name
    # the repo reaches every node and is installed from there; the venv never travels
    assert "." in raw["file_mounts"].values()
    target = next(remote for remote, local in raw["file_mounts"].items() if local == ".")
    assert any(f"pip install -q -e {target.replace('/home/ubuntu', '$HOME')}" in c
               for c in raw["setup_commands"])
    assert ".venv" in raw["rsync_exclude"]
