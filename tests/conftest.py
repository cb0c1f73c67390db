"""Shared fixtures: a real S3 endpoint (moto's server on localhost) and its credentials."""

from __future__ import annotations

import os

import pytest

S3_KEY = "testing-access-key"
S3_SECRET = "testing-secret-PLANTED-9f3c"  # grep-able: must never reach a run folder


@pytest.fixture(scope="session")
def s3_endpoint():
    """Start moto's S3 server on a free port; export AWS settings for this process and its
    children (Ray workers inherit them when Ray starts after this fixture)."""
    from moto.server import ThreadedMotoServer

    env = {
        "AWS_ACCESS_KEY_ID": S3_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_endpoint, request):
    """A fresh bucket; returns (storage options, s3://bucket URL)."""
    import s3fs

    name = "t-" + request.node.name.lower().replace("_", "-")[:40].strip("-")
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, key=S3_KEY, secret=S3_SECRET)
    if not fs.exists(name):
        fs.mkdir(name)
    options = {"s3": {"endpoint_url": s3_endpoint, "key": S3_KEY, "secret": S3_SECRET}}
    return options, f"s3://{name}"


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Ray Train's controller polls its workers every 2 s by default, which adds ~15 s to each tiny
# run here; workers inherit the driver's environment when Ray starts.
_RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


@pytest.fixture(scope="module")
def ray_local(s3_endpoint):
    """A private 2-CPU Ray for one test module, started after the S3 settings are exported (its
    workers inherit them) and with the repository on the workers' PYTHONPATH (fault-injecting
    steps defined in test modules must be importable there). Never someone else's cluster."""
    import ray

    saved = {k: os.environ.get(k) for k in (*_RAY_ENV, "PYTHONPATH")}
    os.environ.update(_RAY_ENV)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")]))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
