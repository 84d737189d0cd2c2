"""Start the real servers the fleet needs on this machine: Redis, Triton, workers, Flower.

Used by ``fleet up`` and by the integration test fixtures. Every child is tied to this
process (it gets SIGTERM if we die) and stopped by :meth:`Processes.stop`, so nothing is
left behind.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import redis

from fleet.connections import redis_at

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_REPOSITORY = REPO_ROOT / "triton_models"
_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def wait_until(check, timeout_s: float, what: str, proc: subprocess.Popen | None = None,
               interval_s: float = 0.1) -> None:
    """Poll ``check`` until it is true; fail early if ``proc`` exits, or after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with code {proc.returncode}")
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(interval_s)
    raise TimeoutError(f"{what}: not ready after {timeout_s:.0f}s")


def _signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to a process group; False when the group has no member left."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member changed user: it is still there
        return True
    return True


def _group_gone(pgid: int, deadline: float) -> bool:
    """Wait until no process is left in group ``pgid`` (True) or ``deadline`` passes."""
    while _signal_group(pgid, 0):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)  # no event tells when another process's child exits
    return True


@dataclass
class Processes:
    """Child processes started together and stopped together."""

    log_dir: Path
    children: dict[str, subprocess.Popen] = field(default_factory=dict)
    _logs: list[IO[bytes]] = field(default_factory=list)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen:
        """Start ``argv`` as ``name``, its output in ``<log_dir>/<name>.log``."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        out = open(self.log_dir / f"{name}.log", "ab")
        self._logs.append(out)
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self.children[name] = proc
        log.debug("started %s (pid %d): %s", name, proc.pid, " ".join(argv))
        return proc

    def stop(self, name: str | None = None, sig: int = signal.SIGTERM, timeout_s: float = 15.0) -> None:
        """Stop one child (or all, last started first) with every process of its group:
        ``sig``, then SIGKILL after ``timeout_s``. Returns once the groups are empty (a Triton
        python stub or a prefork child can outlive its group's leader)."""
        names = [name] if name else list(reversed(self.children))
        for n in names:
            proc = self.children.get(n)
            if proc is not None:
                _signal_group(proc.pid, sig)
        deadline = time.monotonic() + timeout_s
        for n in names:
            proc = self.children.pop(n, None)
            if proc is None:
                continue
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait()
            if not _group_gone(proc.pid, deadline):
                log.warning("%s: members of process group %d outlived it; killing them", n, proc.pid)
                _signal_group(proc.pid, signal.SIGKILL)
                if not _group_gone(proc.pid, time.monotonic() + 5.0):
                    log.warning("%s: process group %d still has members after SIGKILL", n, proc.pid)
        if name is None:
            for out in self._logs:
                out.close()
            self._logs.clear()

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.log_dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


# --- Redis ----------------------------------------------------------------------------

def redis_answers(url: str) -> bool:
    """Whether a Redis server answers PING at ``url``."""
    try:
        return bool(redis_at(url, socket_connect_timeout=1, socket_timeout=1).ping())
    except redis.RedisError:
        return False


def redis_server_binary() -> str:
    """Path of ``redis-server``, installing Debian's package when missing and apt is there."""
    found = shutil.which("redis-server")
    if found:
        return found
    if shutil.which("apt-get") and os.geteuid() == 0:
        log.info("redis-server not found; installing Debian's redis-server")
        subprocess.run(["apt-get", "update", "-qq"], check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", "redis-server"], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        found = shutil.which("redis-server")
        if found:
            return found
    raise RuntimeError("redis-server not found: install Redis (e.g. apt-get install redis-server)")


def write_private(path: Path, text: str) -> Path:
    """Write a file only its owner can read (0600 from the start, never world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)  # an existing file keeps its mode through O_CREAT
    return path


def new_secret(nbytes: int = 24) -> str:
    """A random secret for a password or a key (URL-safe)."""
    import secrets

    return secrets.token_urlsafe(nbytes)


def start_redis(procs: Processes, data_dir: Path, port: int | None = None, name: str = "redis",
                password: str | None = None, config: dict[str, str] | None = None) -> str:
    """Start a loopback-only ``redis-server`` with AOF persistence in ``data_dir``; return its URL.

    The settings go in a 0600 config file, not on the command line, so ``password`` (Redis'
    ``requirepass``) is not shown by ``ps``. ``config`` adds directives (``maxmemory``; with
    ``tls-port`` and the ``tls-*-file`` directives Redis speaks TLS only and the URL is
    ``rediss://`` verifying the server against ``tls-ca-cert-file``).
    """
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    tls = config is not None and "tls-port" in config
    directives = {
        "port": "0" if tls else str(port), "bind": "127.0.0.1", "dir": str(data_dir.resolve()), "appendonly": "yes",
        "appendfsync": "everysec", "save": '""', "protected-mode": "yes", "daemonize": "no",
        **({"requirepass": password} if password else {}), **(config or {}),
    }
    conf = write_private(data_dir / "redis.conf", "".join(f"{k} {v}\n" for k, v in directives.items()))
    proc = procs.start(name, [redis_server_binary(), str(conf)])
    auth = f":{password}@" if password else ""
    if tls:  # TLS only: the plain port is off
        port = int(directives["tls-port"])
        query = f"?ssl_cert_reqs=required&ssl_ca_certs={directives['tls-ca-cert-file']}"
        url = f"rediss://{auth}127.0.0.1:{port}/0{query}"
    else:
        url = f"redis://{auth}127.0.0.1:{port}/0"
    wait_until(lambda: redis_answers(url), 20, f"redis-server on port {port}", proc)
    return url


# --- Triton ---------------------------------------------------------------------------

@dataclass
class TritonEndpoints:
    grpc_url: str
    http_url: str
    metrics_url: str


def _pytriton_dir() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.origin is None:
        raise RuntimeError("nvidia-pytriton is not installed: pip install nvidia-pytriton==0.7.0")
    return Path(spec.origin).parent


def triton_backend_dir(work_dir: Path) -> Path:
    """A backend directory holding the python backend with the stub for this interpreter."""
    pkg = _pytriton_dir() / "tritonserver"
    backends = work_dir / "backends"
    python = backends / "python"
    python.mkdir(parents=True, exist_ok=True)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    sources = {
        "libtriton_python.so": pkg / "backends" / "python" / "libtriton_python.so",
        "triton_python_backend_utils.py": pkg / "backends" / "python" / "triton_python_backend_utils.py",
        "triton_python_backend_stub": pkg / "python_backend_stubs" / version / "triton_python_backend_stub",
    }
    for name, src in sources.items():
        if not src.exists():
            raise RuntimeError(f"nvidia-pytriton lacks {src} (Python {version} unsupported?)")
        dst = python / name
        if dst.is_symlink() or dst.exists():
            dst.unlink()
        dst.symlink_to(src)
    return backends


def http_json(url: str, body: dict | None = None, timeout_s: float = 10.0) -> dict:
    """GET (or POST ``body``) a JSON endpoint."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else {}


def triton_model_ready(http_url: str, model: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{http_url}/v2/models/{model}/ready", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def served_repository(dst: Path, models: list[str], repository: Path = MODEL_REPOSITORY) -> Path:
    """A model repository holding only ``models`` (copied from ``repository``): with model
    control off, Triton serves exactly what is in it."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for model in models:
        shutil.copytree(repository / model, dst / model, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def triton_trace_args(url: str, service: str = "triton", export_delay_ms: int = 5000) -> list[str]:
    """``tritonserver`` flags that trace every request with OpenTelemetry and export the spans
    (OTLP over HTTP) to ``url`` (``http://host:4318/v1/traces``). A request carrying a W3C
    ``traceparent`` (gRPC metadata) gets its spans in the caller's trace.

    Triton samples one request in 1000 and records nothing by default: rate 1 and the
    TIMESTAMPS level record them all, with their queue and compute times as span events.
    """
    return [
        "--trace-config", "mode=opentelemetry", "--trace-config", "rate=1", "--trace-config", "count=-1",
        "--trace-config", "level=TIMESTAMPS", "--trace-config", f"opentelemetry,url={url}",
        "--trace-config", f"opentelemetry,resource=service.name={service}",
        "--trace-config", f"opentelemetry,bsp_schedule_delay={export_delay_ms}",
    ]


def start_triton(procs: Processes, work_dir: Path, models: list[str], name: str = "triton",
                 address: str = "127.0.0.1", repository: Path = MODEL_REPOSITORY,
                 ports: tuple[int, int, int] | None = None, trace: list[str] | None = None) -> TritonEndpoints:
    """Start tritonserver from the nvidia-pytriton wheel serving ``models``; wait until ready.

    Model control is off (``--model-control-mode=none``) over a repository of only the
    served models: nobody who reaches Triton's ports can load a model (a python-backend
    model is code) or unload the one the fleet serves. ``trace``: tracing flags
    (:func:`triton_trace_args`), off when None.
    """
    pkg = _pytriton_dir()
    binary = pkg / "tritonserver" / "bin" / "tritonserver"
    libs = pkg.parent / "nvidia_pytriton.libs"
    http, grpc_port, metrics = ports or (free_port(), free_port(), free_port())
    served = served_repository(work_dir / "models", models, repository)
    argv = [
        str(binary), f"--model-repository={served}", "--model-control-mode=none",
        f"--backend-directory={triton_backend_dir(work_dir)}",
        f"--http-port={http}", f"--grpc-port={grpc_port}", f"--metrics-port={metrics}",
        f"--http-address={address}", f"--grpc-address={address}", f"--metrics-address={address}",
        "--allow-gpu-metrics=false", "--exit-timeout-secs=5", "--log-verbose=0", *(trace or []),
    ]
    bin_dir = str(Path(sys.executable).parent)
    env = {
        # The python backend stub imports numpy (and fleet) from the interpreter first on PATH.
        "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
        "LD_LIBRARY_PATH": f"{libs}:{os.environ.get('LD_LIBRARY_PATH', '')}",
        "PYTHONPATH": f"{REPO_ROOT}:{os.environ.get('PYTHONPATH', '')}",
    }
    proc = procs.start(name, argv, env=env)
    ep = TritonEndpoints(f"127.0.0.1:{grpc_port}", f"127.0.0.1:{http}", f"http://127.0.0.1:{metrics}/metrics")
    try:
        for model in models:
            wait_until(lambda m=model: triton_model_ready(ep.http_url, m), 90, f"triton model {model}", proc, 0.2)
    except Exception:
        raise RuntimeError(f"tritonserver did not come up:\n{procs.log_tail(name)}") from None
    return ep


# --- Celery workers and Flower ----------------------------------------------------------

def start_worker(procs: Processes, name: str, queues: list[str], pool: str, concurrency: int,
                 env: dict[str, str], node: str | None = None, loglevel: str = "INFO") -> str:
    """Start a Celery worker of the fleet consuming ``queues`` (in preference order)."""
    node = node or f"{name}@{socket.gethostname()}"
    procs.start(name, [
        sys.executable, "-m", "celery", "-A", "fleet.steps.worker:app", "worker",
        "-Q", ",".join(queues), "-P", pool, "-c", str(concurrency), "-n", node,
        f"--loglevel={loglevel}", "--without-mingle", "--without-gossip",
    ], env=env)
    return node


def start_flower(procs: Processes, port: int, address: str, basic_auth: str | None,
                 env: dict[str, str] | None = None, name: str = "flower") -> subprocess.Popen:
    """Start Flower for the fleet. Its login comes from the environment (``FLOWER_BASIC_AUTH``,
    which Flower reads itself), never the command line where ``ps`` shows it; with a login
    its API answers to it."""
    flower_env = {**(env or {})}
    if basic_auth:
        flower_env["FLOWER_BASIC_AUTH"] = basic_auth
    return procs.start(name, [
        sys.executable, "-m", "celery", "-A", "fleet.steps.worker:app", "flower", f"--port={port}", f"--address={address}",
    ], env=flower_env)


def worker_answers(app, node: str) -> bool:
    """Whether the worker ``node`` replies to a ping."""
    return bool(app.control.ping(destination=[node], timeout=0.5))


def sim_repository(dst: Path, name: str = "medium_sim", **params: float | int | str) -> Path:
    """A model repository holding a copy of the simulator with some config parameters changed.

    Used by tests and benchmarks to run the dev model with other timing or faults
    (``tpot_ms=2``, ``error_rate=0.1``) without touching ``triton_models/``; ``name`` lets
    several differently timed copies sit in one repository.
    """
    src = MODEL_REPOSITORY / "medium_sim"
    target = dst / name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__"))
    config = target / "config.pbtxt"
    text = re.sub(r'^name:\s*"medium_sim"', f'name: "{name}"', config.read_text(), flags=re.MULTILINE)
    for key, value in params.items():
        pattern = re.compile(r'(key:\s*"%s"\s*value:\s*\{\s*string_value:\s*")[^"]*(")' % re.escape(key))
        text, n = pattern.subn(lambda m: f"{m.group(1)}{value}{m.group(2)}", text)
        if n != 1:
            raise KeyError(f"simulator has no parameter '{key}'")
    config.write_text(text)
    return dst
