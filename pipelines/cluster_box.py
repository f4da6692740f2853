"""A multi-node Ray cluster in a box: try the cluster path on one machine, and test it in CI.

    make box                      # start: a head, 2 worker nodes, S3 on 127.0.0.1, an MLflow server
    source outputs/box/env.sh     # RAY_ADDRESS, MLFLOW_TRACKING_URI, AWS_* for this shell
    make data ARGS="input=s3://box/raw output=s3://box/data"     # ... as on a real cluster
    make box-down                 # stop everything the box started

What a real cluster's nodes share is all they share here: the network (loopback), object storage (a
moto S3 server) and the MLflow tracking server (SQLite backend, artifacts proxied to the bucket).
The head runs no tasks (`--num-cpus=0`, as in every manifest). Each worker node is a `ray start`
in a mount namespace of its own (`unshare -m`, needs root): a private, empty /tmp and an empty
`outputs/` over the checkout's, so a path that exists only on the head or on another node does
not exist there, and a job that hands one to a worker fails instead of passing by luck. The
installed software (the virtualenv) is visible to all, as an image would be.

Each node runs in a process group of its own, so `kill_node` can take one down the way a host
dies (SIGKILL to its raylet and every worker process), and `add_node` can bring a replacement.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lipforcing.config import ConfigError

log = logging.getLogger("lipforcing.box")
REPO_ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "box", "AWS_SECRET_ACCESS_KEY": "box", "AWS_DEFAULT_REGION": "us-east-1"}
STATE_FILE = "box.json"


@dataclass
class BoxConfig:
    root: str = "outputs/box"  # state, logs, the MLflow database, env.sh (on the head's disk)
    workers: int = 2  # worker nodes
    cpus_per_worker: int = 1
    bucket: str = "box"  # created on the S3 server; the MLflow artifacts go to s3://<bucket>/mlflow
    private_mounts: bool = True  # worker nodes in mount namespaces of their own (needs root)


@dataclass
class Box:
    """A running box: its ports, process groups and the environment a client needs."""

    root: str
    s3_port: int
    mlflow_port: int
    gcs_port: int
    dashboard_port: int
    bucket: str
    cpus_per_worker: int
    private_mounts: bool
    token: str  # Ray 2.60 authenticates every node and client with a token; the box makes its own
    pids: dict[str, int] = field(default_factory=dict)  # service or node name -> process-group leader

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def env(self) -> dict[str, str]:
        """What a shell (or a test) sets to use the box exactly as a user uses a remote cluster."""
        return {
            "RAY_ADDRESS": f"http://127.0.0.1:{self.dashboard_port}",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{self.mlflow_port}",
            "AWS_ENDPOINT_URL": self.s3_endpoint,
            **CREDENTIALS,
        }

    def node_env(self) -> dict[str, str]:
        """The environment every node process starts with: the cluster's own storage identity."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
        env.update(CREDENTIALS)
        env.update({
            "AWS_ENDPOINT_URL": self.s3_endpoint, "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0",
            "GLOO_SOCKET_IFNAME": "lo", "DS_ACCELERATOR": "cpu", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
            # the box's GCS for every Ray process a node starts: clients that look the cluster up
            # (Ray Train's placement-group cleaner) must not find another Ray of this machine
            "RAY_ADDRESS": f"127.0.0.1:{self.gcs_port}",
        })  # fmt: skip
        return env

    def save(self) -> None:
        Path(self.root).mkdir(parents=True, exist_ok=True)
        (Path(self.root) / STATE_FILE).write_text(json.dumps(asdict(self), indent=1))
        exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in self.env().items())
        (Path(self.root) / "env.sh").write_text(exports)

    @classmethod
    def load(cls, root: str) -> Box:
        path = Path(root) / STATE_FILE
        if not path.exists():
            raise FileNotFoundError(f"no box at {root} (start one with `make box`)")
        return cls(**json.loads(path.read_text()))

    # ---------------------------------------------------------------- nodes

    def add_node(self, name: str) -> None:
        """Start worker node `name` (its own mount namespace, /tmp and outputs/) and wait until it joins."""
        before = self.alive_nodes()
        temp = "/tmp/ray" if self.private_mounts else str(Path(self.root).resolve() / name)
        ray_start = [
            str(BIN / "ray"), "start", f"--address=127.0.0.1:{self.gcs_port}", "--node-ip-address=127.0.0.1",
            f"--num-cpus={self.cpus_per_worker}", f"--temp-dir={temp}", "--block", "--disable-usage-stats",
            f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
            f"--resources={json.dumps({f'node:{name}': 1})}",
        ]  # fmt: skip
        command = ray_start
        if self.private_mounts:
            outputs = REPO_ROOT / "outputs"
            outputs.mkdir(exist_ok=True)
            script = f"mount -t tmpfs tmpfs /tmp && mount -t tmpfs tmpfs {shlex.quote(str(outputs))} && exec {shlex.join(ray_start)}"
            command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]
        self.pids[name] = self._spawn(name, command)
        self.save()
        wait_until(lambda: self.alive_nodes() > before, 120, f"worker node {name} did not join the cluster")

    def kill_node(self, name: str) -> None:
        """The node dies as a host does: SIGKILL to its raylet and every process it started."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pids.pop(name), signal.SIGKILL)
        self.save()

    def nodes(self) -> list[dict]:
        """Every node the cluster knows (`node_id`, `is_head_node`, `state`, ...) from its State API."""
        return self._state("nodes")

    def tasks(self, name: str) -> list[dict]:
        """Every attempt of the tasks called `name` (`state`, `node_id`, `attempt_number`, ...)."""
        return self._state("tasks", filter_keys="name", filter_predicates="=", filter_values=name, detail="true")

    def actors(self, class_name: str) -> list[dict]:
        """The live actors whose class name contains `class_name` (`node_id`, `state`, ...), e.g. Ray
        Train's `RayTrainWorker` or the data job's `IngestWorker` (inside Ray Data's wrapper name)."""
        found = self._state("actors", detail="true")
        return [actor for actor in found if class_name in actor.get("class_name", "") and actor["state"] == "ALIVE"]

    def node_of(self, node_id: str) -> str:
        """The box's name of a worker node, from its Ray node id."""
        resources = next(n["resources_total"] for n in self.nodes() if n["node_id"] == node_id)
        return next(key.removeprefix("node:") for key in resources if key.startswith("node:worker"))

    def _state(self, resource: str, **query: str) -> list[dict]:
        url = f"http://127.0.0.1:{self.dashboard_port}/api/v0/{resource}?{urllib.parse.urlencode({'limit': 10000, **query})}"
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return json.load(response)["data"]["result"]["result"]
        except (OSError, KeyError, ValueError):  # the dashboard may still be starting
            return []

    def alive_nodes(self) -> int:
        """Nodes the cluster counts alive, head included."""
        return sum(node["state"] == "ALIVE" for node in self.nodes())

    def _spawn(self, name: str, command: list[str], **kwargs) -> int:
        logs = Path(self.root) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with open(logs / f"{name}.log", "ab") as out:
            process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env=self.node_env(), start_new_session=True, **kwargs
            )
        return process.pid


def up(config: BoxConfig) -> Box:
    """Start S3, MLflow, the head and the worker nodes; returns the running box (also saved to disk)."""
    if config.private_mounts and os.geteuid() != 0:
        raise ConfigError("config key 'private_mounts' needs root (unshare -m); run as root or set private_mounts=false")
    root = Path(config.root).resolve()
    if (root / STATE_FILE).exists():
        raise ConfigError(f"a box is already running from {root} (make box-down first)")
    root.mkdir(parents=True, exist_ok=True)
    ports = [free_port() for _ in range(4)]
    box = Box(str(root), *ports, config.bucket, config.cpus_per_worker, config.private_mounts, secrets.token_hex(16))
    try:
        box.pids["s3"] = box._spawn("s3", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(box.s3_port)])
        wait_for_port(box.s3_port)
        _create_bucket(box)
        box.pids["mlflow"] = box._spawn("mlflow", [
            str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(box.mlflow_port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", f"s3://{box.bucket}/mlflow",
        ])  # fmt: skip
        box.pids["head"] = box._spawn("head", [
            str(BIN / "ray"), "start", "--head", "--num-cpus=0", "--node-ip-address=127.0.0.1", "--block",
            f"--port={box.gcs_port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={box.dashboard_port}",
            f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
            f"--temp-dir={root / 'head'}", "--disable-usage-stats",
        ])  # fmt: skip
        box.save()
        wait_until(lambda: box.alive_nodes() >= 1, 120, "the head node did not come up")
        for index in range(config.workers):
            box.add_node(f"worker{index}")
        wait_for_port(box.mlflow_port, timeout=120)
    except BaseException:
        down(str(root))
        raise
    log.info("box up: %d worker nodes; `source %s/env.sh` to use it", config.workers, root)
    return box


def down(root: str) -> None:
    """Stop every process group the box started and forget its state."""
    path = Path(root).resolve()
    state = path / STATE_FILE
    if state.exists():
        box = Box.load(str(path))
        for name in [n for n in box.pids if n.startswith("worker")] + ["head", "mlflow", "s3"]:
            with contextlib.suppress(ProcessLookupError, KeyError):
                os.killpg(box.pids[name], signal.SIGKILL)
        state.unlink()
    shutil.rmtree(path / "head", ignore_errors=True)


def _create_bucket(box: Box) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=box.s3_endpoint, **_boto_credentials())
    client.create_bucket(Bucket=box.bucket)


def _boto_credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "region_name": CREDENTIALS["AWS_DEFAULT_REGION"],
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, timeout: float = 60.0) -> None:
    def listening() -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    wait_until(listening, timeout, f"nothing listening on 127.0.0.1:{port}")


def wait_until(condition, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{message} after {timeout:.0f} s")
        time.sleep(0.5)


def main(argv: list[str]) -> int:
    from pipelines.jobs import configure_logging, resolve_config

    configure_logging()
    if not argv or argv[0] not in ("up", "down"):
        print("usage: python -m pipelines.cluster_box up|down [workers=N root=DIR ...]", file=sys.stderr)
        return 2
    try:
        config = resolve_config(BoxConfig, argv[1:])
        if argv[0] == "up":
            up(config)
            print(f"source {Path(config.root).resolve()}/env.sh")
        else:
            down(config.root)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
