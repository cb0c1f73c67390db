"""The features stage on the same images as loose files, WebDataset shards and Parquet tables,
locally and through a latency-injected S3, in one run.

The images are a synthetic ImageNet-S tree (``--images`` train images of 375–500 px, JPEG), the
loose-files baseline is that tree (``data.layout: imagenet_s``); the shards are the tree converted
by ``pdso-ray make-shards`` (``--images-per-shard``); the tables hold the same bytes with an ``id``
column (``--rows-per-group`` rows per row group, ``--images-per-shard`` rows per table). The S3 is
moto's server behind a small HTTP proxy that waits ``--latency-ms`` before forwarding each
request and counts them (a first-byte latency like S3's from a nearby host; moto itself answers in
about a millisecond). Each variant runs the real ``features`` stage (listing included) into a fresh
run folder on one local Ray; the six take turns for ``--rounds`` rounds (benchmarks/timing.py) and
the table shows medians, with the requests of the last round. The features of every run are
compared bit for bit, image by image (the shards' ids carry their shard's name; the rest is the
same).

    python benchmarks/shard_throughput.py                           # 2,000 images, 20 ms, 3 rounds
    python benchmarks/shard_throughput.py --images 200 --rounds 3   # a quick check
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import numpy as np

from timing import MIN_ROUNDS, interleave

LAYOUTS = ("files", "webdataset", "parquet")


class LatencyProxy:
    """An HTTP proxy in front of ``target`` (host:port) that sleeps ``latency`` seconds before
    forwarding each request and counts requests by kind (GET object, LIST, HEAD, PUT, ...)."""

    def __init__(self, target: str, latency: float):
        self.counts: Counter = Counter()
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                return None

            def _forward(self):
                body = self._body()
                kind = self.command
                if self.command == "GET":
                    query = urlsplit(self.path).query
                    kind = "LIST" if ("list-type" in query or urlsplit(self.path).path.count("/") <= 1) else "GET"
                with proxy.lock:
                    proxy.counts[kind] += 1
                time.sleep(latency)
                conn = http.client.HTTPConnection(target, timeout=120)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
                if body is not None:
                    headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                self.send_response(response.status, response.reason)
                for k, v in response.getheaders():
                    # a HEAD's Content-Length is the object's size: pass it on as it is
                    if k.lower() not in ("transfer-encoding", "connection") and \
                            (k.lower() != "content-length" or self.command == "HEAD"):
                        self.send_header(k, v)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            def _body(self) -> bytes | None:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                        if size == 0:
                            return b"".join(chunks)
                length = self.headers.get("Content-Length")
                return self.rfile.read(int(length)) if length else None

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def take_counts(self) -> Counter:
        with self.lock:
            counts, self.counts = self.counts, Counter()
        return counts


def prepare(tmp: str, images: int, per_shard: int, rows_per_group: int) -> None:
    """The three local copies of the same images below ``tmp``: ``files/`` (an ImageNet-S tree),
    ``webdataset/`` (its shards), ``parquet/`` (tables of the same bytes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pdso_ray.data.layouts import build_layout
    from pdso_ray.config import DataConfig
    from pdso_ray.data.make_shards import make_shards
    from pdso_ray.data.synthetic import make_demo_dataset
    from pdso_ray.data.ids import rel_of
    from pdso_ray.storage import Storage

    storage = Storage()
    classes = 4
    tree = os.path.join(tmp, "files")
    make_demo_dataset(tree, classes=classes, train_per_class=images // classes, val_per_class=1,
                      test_per_class=1, image_size=(375, 500))
    make_shards(storage, tree, os.path.join(tmp, "webdataset"), per_shard)
    records = build_layout(DataConfig(root=tree, classes=classes), storage).list_split(storage, "train").images
    for start in range(0, len(records), per_shard):
        part = records[start:start + per_shard]
        table = pa.table({"id": [rel_of(r.id) for r in part], "image": [storage.read_bytes(r.path) for r in part],
                          "cls": [r.wnid for r in part]})
        path = os.path.join(tmp, "parquet", "train", f"part-{start // per_shard:05d}.parquet")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        pq.write_table(table, path, row_group_size=rows_per_group)


def start_ray(cpus: int, attempts: int = 5) -> None:
    """A local Ray; on a loaded host the raylet can miss Ray's 30 s start-up deadline: try again."""
    import ray

    for attempt in range(1, attempts + 1):
        try:
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
            return
        except Exception:  # noqa: BLE001 - Ray raises a bare Exception for this
            ray.shutdown()
            if attempt == attempts:
                raise
            time.sleep(10)


def upload(storage, local_root: str, url: str) -> None:
    for folder, _, names in os.walk(local_root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                storage.write_bytes(f"{url}/{os.path.relpath(path, local_root)}", f.read())


def canonical(image_id: str) -> str:
    """An image's id without its shard's name (``train/000003/n01/x`` → ``train/n01/x``)."""
    split, rest = image_id.split("/", 1)
    return f"{split}/{rest.split('/', 1)[1]}" if rest.split("/", 1)[0].isdigit() else image_id


def features_of(storage, output: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from pdso_ray.tables import arrow_to_vectors, read_folder

    table = read_folder(storage, f"{output}/features", ["id", "feat", "feat_flip"])
    feat, flip = arrow_to_vectors(table.column("feat")), arrow_to_vectors(table.column("feat_flip"))
    return {canonical(i): (feat[k], flip[k]) for k, i in enumerate(table.column("id").to_pylist())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--images-per-shard", type=int, default=250)
    parser.add_argument("--rows-per-group", type=int, default=100)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=MIN_ROUNDS)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    parser.add_argument("--work-dir", default=None,
                        help="where the images and runs go, kept for the next run (default: a temporary folder)")
    args = parser.parse_args()

    import ray
    from moto.server import ThreadedMotoServer

    from pdso_ray.config import load_config
    from pdso_ray.pipeline import run_pipeline
    from pdso_ray.storage import Storage

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    for k, v in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        os.environ.setdefault(k, v)
    load_before = os.getloadavg()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    proxy = LatencyProxy(f"{host}:{port}", args.latency_ms / 1000.0)
    direct = Storage({"s3": {"endpoint_url": f"http://{host}:{port}"}})
    direct.fs("s3://bench")[0].mkdir("bench")
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.work_dir or scratch
        data = os.path.join(tmp, f"data-{args.images}-{args.images_per_shard}-{args.rows_per_group}")
        if not os.path.exists(os.path.join(data, "READY")):  # made once per work dir and sizes
            shutil.rmtree(data, ignore_errors=True)
            prepare(data, args.images, args.images_per_shard, args.rows_per_group)
            open(os.path.join(data, "READY"), "w").close()
        sources = {"files": ("imagenet_s", os.path.join(data, "files")),
                   "webdataset": ("webdataset", os.path.join(data, "webdataset")),
                   "parquet": ("parquet", os.path.join(data, "parquet"))}
        shutil.rmtree(os.path.join(tmp, "runs"), ignore_errors=True)
        for name, (_, root) in sources.items():
            upload(direct, root, f"s3://bench/{name}")
        start_ray(args.cpus)
        runs, requests = {}, {}

        def variant(name: str, where: str):
            layout, root = sources[name]
            s3 = where == "s3"
            count = iter(range(10 ** 6))

            def run() -> dict[str, float]:
                output = (f"s3://bench/runs/{name}-{next(count)}" if s3
                          else os.path.join(tmp, "runs", f"{name}-{where}-{next(count)}"))
                cfg = load_config("jobs/configs/demo.yaml", [
                    "stages=features", f"data.layout={layout}", f"data.root={f's3://bench/{name}' if s3 else root}",
                    "data.classes=4", f"output={output}", f"features.batch_size={args.batch}",
                    "features.rows_per_file=500", *([f"storage.s3.endpoint_url={proxy.url}"] if s3 else [])])
                proxy.take_counts()
                summary = run_pipeline(cfg)
                counts = proxy.take_counts()
                seconds = summary["stages"]["features"]["seconds"]
                assert summary["images_ok"] == args.images, summary
                runs.setdefault(f"{name} {where}", []).append(output)
                requests[f"{name} {where}"] = dict(counts)
                return {"rate": args.images / seconds, "seconds": seconds, "requests": sum(counts.values())}
            return run

        contenders = {f"{name} {where}": variant(name, where) for where in ("local", "s3") for name in LAYOUTS}
        rounds = interleave(contenders, args.rounds)
        ray.shutdown()
        storage = Storage({"s3": {"endpoint_url": f"http://{host}:{port}"}})
        reference = features_of(storage, runs["files local"][0])
        identical = {key: all(_same(reference, features_of(storage, out)) for out in outs) for key, outs in runs.items()}
    moto.stop()
    load_after = os.getloadavg()

    print(f"{args.images} images (JPEG 375-500 px), features stage (demo.yaml: vit_tiny_reg4 at 64 px, "
          f"batch {args.batch}) on a local Ray of {args.cpus} CPUs; S3 = moto + {args.latency_ms:g} ms "
          f"per request; {args.images_per_shard} images per shard / table, {args.rows_per_group} rows "
          f"per row group; {rounds.count} interleaved rounds, medians")
    print(f"machine: {os.cpu_count()} cores, load average {load_before[0]:.1f} before, {load_after[0]:.1f} after")
    print("| source | where | images/s | seconds | requests (last round) | same features |")
    print("|---|---|---|---|---|---|")
    for key in contenders:
        name, where = key.split()
        kinds = ", ".join(f"{v} {k}" for k, v in sorted(requests[key].items())) if where == "s3" else "—"
        print(f"| {name} | {where} | {rounds.median(key):.1f} | {rounds.median(key, 'seconds'):.1f} | "
              f"{kinds} | {'yes' if identical[key] else 'NO'} |")
    for name in ("webdataset", "parquet"):
        print(f"{name} / files through S3: {rounds.ratio(f'{name} s3', 'files s3'):.2f}x "
              f"(rounds: {' '.join(f'{r:.2f}' for r in rounds.ratios(f'{name} s3', 'files s3'))}); "
              f"locally: {rounds.ratio(f'{name} local', 'files local'):.2f}x")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "shard_throughput.json"), "w") as f:
            json.dump({"args": vars(args), "results": rounds.results, "requests": requests,
                       "identical": identical, "load": [load_before, load_after]}, f, indent=1)


def _same(reference: dict, other: dict) -> bool:
    return reference.keys() == other.keys() and all(
        np.array_equal(reference[k][0], other[k][0]) and np.array_equal(reference[k][1], other[k][1])
        for k in reference)


if __name__ == "__main__":
    main()
