"""The deployment files (compose/, ops/, the production model's configuration) agree with
the code and with each other.

Checks that a typo in a path, a queue name, a settings variable, a replica of the inference
pool or a scrape target is caught here rather than on a GPU host. Alert rules also go through ``promtool check rules``
(and the Prometheus config through ``promtool check config``): promtool from PATH, or
taken out of Debian's prometheus package; a visible skip where neither can be had.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from fleet.broker.queues import all_queues
from fleet.settings import ReplicaSpec, Settings

ROOT = Path(__file__).resolve().parents[3]
COMPOSE_DIR = ROOT / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
ENV_EXAMPLE = COMPOSE_DIR / ".env.example"
PROMETHEUS_CONFIG = COMPOSE_DIR / "prometheus" / "prometheus.yml"
ALERTS = ROOT / "ops" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "ops" / "grafana" / "fleet-dashboard.json"
K8S_DIR = ROOT / "ops" / "k8s"
MEDIUM_DIR = ROOT / "triton_models" / "medium"

# FLEET_* variables that deployment files set although Settings has no field for them:
# read by the gateway (its API keys).
FLEET_VARS_OUTSIDE_SETTINGS = {"FLEET_API_KEYS"}

# Services that may publish a port on every interface: each has its own login.
AUTHENTICATED_SERVICES = {"gateway", "flower", "grafana"}

WORKER_SERVICES = {"inference-interactive", "inference-shared", "tools"}
REDIS_SERVERS = {"redis-0", "redis-1", "redis-2"}
SENTINELS = {"sentinel-0", "sentinel-1", "sentinel-2"}
# Every process of the fleet's own image: each finds Redis through the Sentinels.
FLEET_SERVICES = {"gateway", "flower", *WORKER_SERVICES}
INFERENCE_SERVICES = {"inference-interactive", "inference-shared"}


# --- helpers ---------------------------------------------------------------------------

def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def _services() -> dict[str, dict[str, Any]]:
    return _compose()["services"]


def _interpolation_names(text: str) -> set[str]:
    """Names of ``${VAR}`` / ``${VAR:-x}`` / ``$VAR`` compose interpolates (``$$`` escapes)."""
    text = text.replace("$$", "")
    braced = re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", text)
    bare = re.findall(r"\$([A-Za-z_][A-Za-z0-9_]*)", text)
    return set(braced) | set(bare)


def _with_defaults(value: str) -> str:
    """A compose string with each ``${VAR:-default}`` replaced by its default."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?-([^}]*)\}", r"\1", value)


def _env_example_names() -> set[str]:
    names = set()
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            names.add(line.split("=", 1)[0].strip())
    return names


def _env_mapping(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command") or []
    return cmd.split() if isinstance(cmd, str) else [str(c) for c in cmd]


def _option(args: list[str], flag: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _bind_mounts(service: dict[str, Any]) -> list[tuple[Path, str]]:
    """(host path, container path) of each bind mount; named volumes are left out."""
    mounts = []
    for vol in service.get("volumes") or []:
        if isinstance(vol, dict):
            if vol.get("type") != "bind":
                continue
            source, target = vol["source"], vol["target"]
        else:
            parts = vol.split(":")
            if len(parts) < 2 or not parts[0].startswith((".", "/")):
                continue
            source, target = parts[0], parts[1]
        mounts.append(((COMPOSE_DIR / source).resolve(), target))
    return mounts


def _host_path(service: dict[str, Any], container_path: str) -> Path | None:
    """The host path a container path of this service comes from, by its bind mounts."""
    wanted = PurePosixPath(container_path)
    for host, target in _bind_mounts(service):
        target_path = PurePosixPath(target)
        if wanted == target_path:
            return host
        if target_path in wanted.parents:
            return host / wanted.relative_to(target_path)
    return None


def _k8s_docs() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                doc["__file__"] = path.name
                docs.append(doc)
    return docs


def _k8s(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in _k8s_docs() if d["kind"] == kind}


def _containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    return workload["spec"]["template"]["spec"]["containers"]


def _queues_of(args: list[str]) -> list[str]:
    value = _option(args, "-Q") or _option(args, "--queues")
    return value.split(",") if value else []


def _expected_queues() -> list[str]:
    return all_queues(Settings(_env_file=None))


def _replicas(value: str) -> list[ReplicaSpec]:
    """The inference pool a FLEET_TRITON_REPLICAS value describes, as the fleet reads it."""
    return Settings(_env_file=None, triton_replicas=value).replicas()


def _triton_services() -> dict[str, dict[str, Any]]:
    """The compose services of the inference pool (triton-0, triton-1, ...), in order."""
    found = {n: s for n, s in _services().items() if re.fullmatch(r"triton-\d+", n)}
    return dict(sorted(found.items(), key=lambda item: int(item[0].split("-")[1])))


# --- the production model ------------------------------------------------------------------

def _model_config() -> Any:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse((MEDIUM_DIR / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def test_model_capacity_in_config_pbtxt_is_the_engines() -> None:
    # The fleet reads max_num_seqs from the model config (ModelConfig) as each replica's
    # capacity; the vLLM engine takes its own from model.json. The two must agree.
    config = _model_config()
    engine = json.loads((MEDIUM_DIR / "1" / "model.json").read_text())
    # The model is 1/model.py, the fleet's thin subclass of the vLLM backend's own model.
    assert config.name == "medium" and config.backend == "python" and (MEDIUM_DIR / "1" / "model.py").exists()
    declared = config.parameters["max_num_seqs"].string_value
    assert declared.isdigit() and int(declared) == engine["max_num_seqs"] > 0
    # The engine reports its running and waiting sequences on Triton's metrics port only
    # with custom metrics on and its statistics kept.
    assert config.parameters["REPORT_CUSTOM_METRICS"].string_value == "true"
    assert engine.get("disable_log_stats") is False


# --- compose -------------------------------------------------------------------------------

def test_compose_parses_with_the_expected_services() -> None:
    services = _services()
    expected = {"triton-0", "triton-1", "gateway", "flower", "prometheus", "grafana"} | WORKER_SERVICES | REDIS_SERVERS | SENTINELS
    assert expected <= set(services)
    assert "triton" not in services, "Triton runs as replicas triton-0, triton-1, ..."
    assert "redis" not in services, "Redis runs as servers redis-0, redis-1, redis-2 behind Sentinels"
    for name, service in services.items():
        assert "image" in service or "build" in service, name


def test_compose_referenced_files_exist() -> None:
    for name, service in _services().items():
        for host, target in _bind_mounts(service):
            assert host.exists(), f"{name}: mount {host} -> {target} does not exist"
        env_files = service.get("env_file") or []
        for env_file in [env_files] if isinstance(env_files, str) else env_files:
            path = env_file if isinstance(env_file, str) else env_file["path"]
            assert (COMPOSE_DIR / path).exists(), f"{name}: env_file {path} missing"
        build = service.get("build")
        if build:
            context = COMPOSE_DIR / (build if isinstance(build, str) else build.get("context", "."))
            assert context.is_dir(), f"{name}: build context {context} missing"
            dockerfile = context / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")
            assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
            assert "pip install ." in dockerfile.read_text()


def test_triton_serves_only_medium_with_model_control_off() -> None:
    tritons = _triton_services()
    assert list(tritons) == [f"triton-{i}" for i in range(len(tritons))] and len(tritons) >= 1
    for name, triton in tritons.items():
        args = _command(triton)
        repo = _option(args, "--model-repository")
        assert repo is not None, name
        # Only the production model is in the served repository: with model control off
        # (mode none) Triton loads it at start and refuses every load and unload.
        assert _option(args, "--model-control-mode") == "none", name
        assert _option(args, "--load-model") is None, name
        mounts = {target: host for host, target in _bind_mounts(triton)}
        inside = [t for t in mounts if PurePosixPath(t).parent == PurePosixPath(repo)]
        assert inside == [f"{repo}/medium"], mounts
        assert mounts[inside[0]] == MEDIUM_DIR.resolve()
        assert all(v.endswith(":ro") for v in triton["volumes"] if isinstance(v, str) and "triton_models" in v)
        assert "/v2/health/ready" in " ".join(triton["healthcheck"]["test"]), name
        assert "ports" not in triton, f"{name}: Triton has no auth: keep it off the host's ports"


def test_triton_replicas_share_one_definition_each_on_its_own_gpu() -> None:
    tritons = _triton_services()
    # One definition (a YAML anchor): the replicas differ only in the GPU they hold.
    bodies = [{k: v for k, v in s.items() if k != "deploy"} for s in tritons.values()]
    assert all(body == bodies[0] for body in bodies)
    gpus: list[str] = []
    for name, triton in tritons.items():
        devices = triton["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1, name
        device = devices[0]
        # device_ids pins the replica; "count" would let Docker pick any GPU (and may not
        # be combined with device_ids).
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and "count" not in device, name
        assert device["device_ids"], name
        gpus += [str(g) for g in device["device_ids"]]
    assert len(gpus) == len(set(gpus)), f"two replicas on one GPU: {gpus}"


def test_compose_pool_lists_every_triton_service() -> None:
    """FLEET_TRITON_REPLICAS, the triton-N services and Prometheus's triton job name the
    same replicas, at ports the services expose."""
    tritons = _triton_services()
    services = _services()
    for name in (*INFERENCE_SERVICES, "gateway"):
        env = _env_mapping(services[name])
        replicas = _replicas(env["FLEET_TRITON_REPLICAS"])
        assert [r.name for r in replicas] == list(tritons), name
        for replica in replicas:
            expose = {str(p) for p in tritons[replica.name]["expose"]}
            assert replica.grpc_url == f"{replica.name}:8001" and "8001" in expose
            assert replica.metrics_url == f"http://{replica.name}:8002/metrics" and "8002" in expose
            # Capacity comes from each replica's model config (max_num_seqs), not from here.
            assert replica.max_sequences is None
        # The single-Triton settings are unused once the replicas are listed: none is set.
        assert not {"FLEET_TRITON_GRPC_URL", "FLEET_TRITON_HTTP_URL", "FLEET_TRITON_METRICS_URL"} & set(env), name
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "triton")
    targets = [t for static in job["static_configs"] for t in static["targets"]]
    assert targets == [f"{name}:8002" for name in tritons]


def test_prometheus_and_grafana_files_are_mounted() -> None:
    services = _services()
    prom = services["prometheus"]
    config_path = _option(_command(prom), "--config.file")
    assert config_path is not None
    assert _host_path(prom, config_path) == PROMETHEUS_CONFIG.resolve()
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    rule_files = [p for pattern in config["rule_files"] for p in _glob_in_container(prom, pattern)]
    assert ALERTS.resolve() in rule_files

    grafana = services["grafana"]
    provisioning = _host_path(grafana, "/etc/grafana/provisioning")
    assert provisioning is not None
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    assert datasources["datasources"][0]["type"] == "prometheus"
    providers = yaml.safe_load((provisioning / "dashboards" / "fleet.yml").read_text())["providers"]
    dashboard_dirs = [_host_path(grafana, p["options"]["path"]) for p in providers]
    assert any(d is not None and (d / DASHBOARD.name).resolve() == DASHBOARD.resolve() for d in dashboard_dirs)


def _glob_in_container(service: dict[str, Any], pattern: str) -> list[Path]:
    directory, _, name_pattern = pattern.rpartition("/")
    host_dir = _host_path(service, directory)
    if host_dir is not None and host_dir.is_dir():
        return [p.resolve() for p in host_dir.glob(name_pattern)]
    # The directory may be assembled from single-file mounts.
    found = []
    for host, target in _bind_mounts(service):
        target_path = PurePosixPath(target)
        if str(target_path.parent) == directory and target_path.match(name_pattern):
            found.append(host)
    return found


def test_every_interpolated_variable_is_documented() -> None:
    used = _interpolation_names(COMPOSE_FILE.read_text())
    documented = _env_example_names()
    assert used, "compose uses no variables: the test's parser is broken"
    assert used <= documented, f"not in compose/.env.example: {sorted(used - documented)}"


def test_env_example_holds_no_secret_values() -> None:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    for secret in ("REDIS_PASSWORD", "FLEET_API_KEYS", "FLEET_FLOWER_BASIC_AUTH", "GRAFANA_ADMIN_PASSWORD"):
        assert values.get(secret, None) == "", f"{secret} must be present and empty in .env.example"


def _fleet_vars_in_k8s() -> set[str]:
    names: set[str] = set()
    for doc in _k8s_docs():
        if doc["kind"] == "ConfigMap":
            names |= set(doc.get("data") or {})
        if doc["kind"] in ("Deployment", "StatefulSet"):
            for container in _containers(doc):
                names |= {e["name"] for e in container.get("env") or []}
    return {n for n in names if n.startswith("FLEET_")}


def test_fleet_variables_are_settings_fields() -> None:
    fields = {f"FLEET_{name.upper()}" for name in Settings.model_fields}
    used = {n for n in _interpolation_names(COMPOSE_FILE.read_text()) if n.startswith("FLEET_")}
    for service in _services().values():
        used |= {n for n in _env_mapping(service) if n.startswith("FLEET_")}
    used |= {n for n in _env_example_names() if n.startswith("FLEET_")}
    used |= _fleet_vars_in_k8s()
    unknown = used - fields - FLEET_VARS_OUTSIDE_SETTINGS
    assert not unknown, f"FLEET_* variables that Settings does not read: {sorted(unknown)}"


def test_fleet_settings_in_compose_are_valid() -> None:
    """The FLEET_* values a worker gets (defaults filled in) build a Settings."""
    env = _env_mapping(_services()["inference-interactive"])
    values = {
        k[len("FLEET_"):].lower(): _with_defaults(v)
        for k, v in env.items()
        if k.startswith("FLEET_") and k not in FLEET_VARS_OUTSIDE_SETTINGS and "${" not in _with_defaults(v)
    }
    settings = Settings(_env_file=None, **values)
    assert settings.triton_model == "medium"
    assert [r.name for r in settings.replicas()] == list(_triton_services())
    assert settings.visibility_timeout_s > settings.step_time_limit_s


def test_published_ports_are_unique_and_guarded() -> None:
    seen: dict[tuple[str, str], str] = {}
    for name, service in _services().items():
        for port in service.get("ports") or []:
            spec = _with_defaults(str(port["published"]) if isinstance(port, dict) else str(port))
            parts = spec.split(":")
            host_ip, host_port = (parts[0], parts[1]) if len(parts) == 3 else ("0.0.0.0", parts[0])
            assert host_port, f"{name}: {port} publishes no host port"
            key = (host_ip, host_port)
            assert key not in seen, f"{name} and {seen[key]} both publish {key}"
            assert all(host_port != other_port for (_, other_port) in seen), f"{name}: port {host_port} reused"
            seen[key] = name
            if host_ip != "127.0.0.1":
                assert name in AUTHENTICATED_SERVICES, f"{name} is published beyond loopback without auth"
    assert {n for n in seen.values()} >= {"gateway", "flower", "grafana"}
    # Redis servers and Sentinels are reached over the compose network only (by the names the
    # Sentinels announce, which the host cannot resolve).
    assert not set(seen.values()) & (REDIS_SERVERS | SENTINELS)
    assert not set(seen.values()) & set(_triton_services()), "Triton has no auth: keep it off the host's ports"


def test_redis_servers_are_durable_password_protected_and_replicate_redis_0() -> None:
    services = _services()
    for name in sorted(REDIS_SERVERS):
        server = services[name]
        command = " ".join(_command(server))
        assert "--appendonly yes" in command and "--maxmemory-policy noeviction" in command, name
        # The password reaches Redis through a private config file, never its command line;
        # masterauth lets any of them follow whichever is the primary.
        assert "requirepass %s" in command and "masterauth %s" in command and "umask 077" in command, name
        assert "--requirepass" not in command and "--masterauth" not in command, name
        # Announced by its compose name, which survives a restart (an IP does not).
        assert "replica-announce-ip" in command and _env_mapping(server)["REDIS_NAME"] == name
        assert any(str(v) == f"{name}-data:/data" for v in server["volumes"]), name
        assert "6379" in {str(p) for p in server["expose"]}
    replica_of = {name: _env_mapping(services[name])["REDIS_REPLICA_OF"] for name in REDIS_SERVERS}
    assert replica_of == {"redis-0": "", "redis-1": "redis-0", "redis-2": "redis-0"}


def test_sentinels_watch_redis_0_by_majority_with_their_own_password() -> None:
    services = _services()
    for name in sorted(SENTINELS):
        sentinel = services[name]
        command = " ".join(_command(sentinel))
        assert command.rstrip().endswith("--sentinel") and "redis-server /data/sentinel.conf" in command, name
        # Two of three must agree that the primary is down: one cut off from the others
        # can neither call it down nor promote a replica.
        assert "sentinel monitor fleet redis-0 6379 2" in command, name
        assert "requirepass $$REDIS_SENTINEL_PASSWORD" in command and "sentinel auth-pass fleet $$REDIS_PASSWORD" in command
        assert "sentinel sentinel-pass $$REDIS_SENTINEL_PASSWORD" in command
        assert "sentinel announce-hostnames yes" in command and "sentinel resolve-hostnames yes" in command
        assert "down-after-milliseconds fleet $$REDIS_DOWN_AFTER_MS" in command
        assert _env_mapping(sentinel)["SENTINEL_NAME"] == name
        # It rewrites its file as it learns the topology: a volume of its own, written once.
        assert any(str(v) == f"{name}-data:/data" for v in sentinel["volumes"]), name
        assert "[ ! -f /data/sentinel.conf ]" in command, name
        assert "26379" in {str(p) for p in sentinel["expose"]}
    assert len(SENTINELS) % 2 == 1


def test_fleet_services_follow_the_primary_through_the_sentinels() -> None:
    services = _services()
    for name in sorted(FLEET_SERVICES):
        env = _env_mapping(services[name])
        assert "FLEET_REDIS_URL" not in env, f"{name}: Redis is found through the Sentinels"
        settings = Settings(_env_file=None, redis_sentinels=env["FLEET_REDIS_SENTINELS"],
                            redis_master_name=env["FLEET_REDIS_MASTER_NAME"])
        assert {h for h, _ in settings.sentinel_addresses()} == SENTINELS, name
        assert {p for _, p in settings.sentinel_addresses()} == {26379}
        assert settings.redis_master_name == "fleet" and settings.wait_replicas() == 1
        assert "${REDIS_PASSWORD:?" in env["FLEET_REDIS_PASSWORD"], name
        assert "${REDIS_SENTINEL_PASSWORD:?" in env["FLEET_REDIS_SENTINEL_PASSWORD"], name
        depends = services[name]["depends_on"]
        assert {d for d in depends if d in SENTINELS} == SENTINELS, name
        assert all(depends[d]["condition"] == "service_healthy" for d in SENTINELS | {"redis-0"}), name


def test_worker_queues_match_routing() -> None:
    expected = _expected_queues()
    services = _services()
    consumed: set[str] = set()
    for name in WORKER_SERVICES:
        args = _command(services[name])
        queues = _queues_of(args)
        assert queues and set(queues) <= set(expected), f"{name}: {queues}"
        # Interactive first: the Redis transport drains queues in the order given.
        assert queues == sorted(queues, key=expected.index), f"{name}: {queues} out of order"
        assert args[:4] == ["celery", "-A", "fleet.steps.worker:app", "worker"], name
        consumed |= set(queues)
    assert consumed == set(expected)
    assert _queues_of(_command(services["inference-interactive"])) == ["llm.interactive"]
    for name in INFERENCE_SERVICES:
        assert _option(_command(services[name]), "-P") == "threads"
        env = _env_mapping(services[name])
        assert env["FLEET_TRITON_MODEL"] == "medium"
        # The first replica must be ready; the pool takes the others in as they come up.
        depends = services[name]["depends_on"]
        assert depends["triton-0"]["condition"] == "service_healthy"
        assert not {d for d in depends if d.startswith("triton")} - {"triton-0"}, name
    assert _option(_command(services["tools"]), "-P") == "prefork"


def test_prometheus_scrapes_compose_services() -> None:
    services = _services()
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    hosts: dict[str, set[str]] = {}
    for job in config["scrape_configs"]:
        for static in job.get("static_configs") or []:
            for target in static["targets"]:
                host, _, port = target.rpartition(":")
                hosts.setdefault(job["job_name"], set()).add(host)
                assert str(port) in {str(p) for p in services[host].get("expose") or []} | {
                    str(p).rsplit(":", 1)[-1] for p in services[host].get("ports") or []
                }, f"{target}: port not exposed by {host}"
        for dns in job.get("dns_sd_configs") or []:
            for host in dns["names"]:
                hosts.setdefault(job["job_name"], set()).add(host)
                assert str(dns["port"]) in {str(p) for p in services[host].get("expose") or []}
    for job, names in hosts.items():
        assert names <= set(services), f"job {job} scrapes unknown services {names - set(services)}"
    scraped = set().union(*hosts.values())
    assert {"gateway", "flower"} | WORKER_SERVICES | set(_triton_services()) <= scraped
    assert hosts["triton"] == set(_triton_services())
    for name in WORKER_SERVICES:
        assert _env_mapping(services[name])["FLEET_METRICS_PORT"] == "9808"


@pytest.fixture(scope="module")
def promtool() -> str:
    """promtool: on PATH, or taken out of Debian's prometheus package (extracted into the
    virtualenv, never installed: the package would start a Prometheus server)."""
    found = shutil.which("promtool")
    if found:
        return found
    local = ROOT / ".venv" / "promtool" / "usr" / "bin" / "promtool"
    if local.exists():
        return str(local)
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        pytest.skip("promtool is not on PATH and Debian's prometheus package cannot be fetched here")
    work = local.parents[2]
    work.mkdir(parents=True, exist_ok=True)
    fetch = ["apt-get", "download", "-q", "prometheus"]
    if subprocess.run(fetch, cwd=work, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
        subprocess.run(fetch, cwd=work, capture_output=True, check=True)
    deb = next(work.glob("prometheus_*.deb"))
    subprocess.run(["dpkg", "-x", str(deb), str(work)], check=True)
    deb.unlink()
    return str(local)


def test_prometheus_config_passes_promtool(tmp_path: Path, promtool: str) -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert config["rule_files"]
    # Point the rule files at the repository copies, as the container mounts do.
    config["rule_files"] = [str(ALERTS)]
    local = tmp_path / "prometheus.yml"
    local.write_text(yaml.safe_dump(config))
    result = subprocess.run([promtool, "check", "config", "--syntax-only", str(local)],
                            capture_output=True, text=True)
    if "unknown flag" in result.stderr:  # older promtool
        result = subprocess.run([promtool, "check", "config", str(local)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --- alert rules ---------------------------------------------------------------------------

# Triton's own per-model metrics the rules and the dashboard may read (its metrics port), and
# the scrape's "up".
TRITON_METRICS = {
    "up", "nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count",
    "nv_inference_exec_count", "nv_inference_request_duration_us", "nv_inference_queue_duration_us",
    "nv_inference_compute_input_duration_us", "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us", "nv_inference_pending_request_count",
}


def _fleet_metric_names() -> set[str]:
    """Every series name the fleet's /metrics serves: the hooks' metrics and the fleet-wide
    gauges (collected once over a stand-in Redis)."""
    from prometheus_client.metrics import MetricWrapperBase

    from fleet.inference.replicas import ReplicaState
    from fleet.ops import metrics
    from fleet.ops.gauges import FleetCollector

    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    names = set()
    for obj in vars(metrics).values():
        if isinstance(obj, MetricWrapperBase):
            for family in obj.describe():
                names |= {family.name + s for s in suffixes[family.type]}

    class _Redis:
        def llen(self, key: str) -> int:
            return 0

        def lindex(self, key: str, index: int) -> None:
            return None

        def hgetall(self, key: str) -> dict[str, str]:
            return {}
        def smembers(self, key: str) -> set[str]:
            return {"default"}

        def hlen(self, key: str) -> int:
            return 0

        def zcard(self, key: str) -> int:
            return 0

    class _Board:
        def states(self) -> list[ReplicaState]:
            return [ReplicaState(name="triton-0", grpc_url="triton-0:8001", up=True, capacity=64)]

    collector = FleetCollector(Settings(_env_file=None, tenants='[{"name": "a", "quotas": {"tokens_per_day": 9}}]'))
    collector.redis, collector.board = _Redis(), _Board()  # type: ignore[assignment]
    for family in collector.collect():
        names |= {sample.name for sample in family.samples}
    return names


KNOWN_METRICS = _fleet_metric_names() | TRITON_METRICS

_PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset", "group_left", "group_right"}


def _metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (not functions, keywords or label names)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"(?<![\w:$.])([A-Za-z_:][\w:]*)\s*(\()?", text):
        if match.group(2) is None and match.group(1) not in _PROMQL_KEYWORDS:
            names.add(match.group(1))
    return names


def test_metric_names_are_read_from_promql() -> None:
    assert _metric_names(
        'histogram_quantile(0.99, sum by (le, priority) (rate(fleet_run_latency_seconds_bucket{priority=~"$p"}'
        '[$__rate_interval]))) > 1e-9 or absent(up{job="triton"} == 1) and max by (replica) '
        "(fleet_replica_up * fleet_replica_capacity_sequences) <= bool 0.5") == {
        "fleet_run_latency_seconds_bucket", "up", "fleet_replica_up", "fleet_replica_capacity_sequences"}
    assert {"fleet_replica_preemptions_total", "fleet_replica_up", "fleet_queue_depth",
            "fleet_run_latency_seconds_bucket", "fleet_tokens_out_total"} <= KNOWN_METRICS


def test_alert_rules_are_complete() -> None:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    alerts = {}
    for group in groups:
        assert group["name"] and group["rules"]
        for rule in group["rules"]:
            name = rule["alert"]
            assert name not in alerts, f"duplicate alert {name}"
            alerts[name] = rule
            assert rule["expr"].strip(), name
            assert "for" in rule and re.fullmatch(r"\d+[smh]", str(rule["for"])), name
            assert rule["labels"]["severity"] in {"page", "ticket"}, name
            annotations = rule["annotations"]
            assert annotations["summary"] and annotations["description"], name
            runbook = annotations["runbook_url"].split("#", 1)[0]
            assert runbook.startswith("ops/runbooks/") and (ROOT / runbook).is_file(), name
    exprs = " ".join(r["expr"] for r in alerts.values())
    for needle in ('fleet_run_latency_seconds_bucket{priority="interactive"}', "fleet_dead_letters_total",
                   "fleet_queue_oldest_age_seconds", 'up{job="triton"}', "nv_inference_",
                   "max by (replica) (fleet_replica_up)", "fleet_replica_capacity_sequences"):
        assert needle in exprs, needle
    assert {"TritonNotReady", "FleetReplicaDown", "FleetPoolCapacityLost"} <= set(alerts)
    for name, rule in alerts.items():
        unknown = _metric_names(rule["expr"]) - KNOWN_METRICS
        assert not unknown, f"{name}: unknown metrics {sorted(unknown)}"


def test_alert_runbook_anchors_exist() -> None:
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            path, _, anchor = rule["annotations"]["runbook_url"].partition("#")
            if anchor:
                headings = re.findall(r"^#+\s+(.+)$", (ROOT / path).read_text(), flags=re.M)
                slugs = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in headings}
                assert anchor in slugs, f"{rule['alert']}: no heading for #{anchor} in {path}"


def test_alert_rules_pass_promtool(promtool: str) -> None:
    result = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _pool_series(up: dict[str, int], capacity: int = 64) -> list[dict[str, str]]:
    """Input series of a pool whose replicas are up (1) or down (0), as two fleet processes
    export them, and one Triton scrape target per replica."""
    series = []
    for name, state in up.items():
        for process in ("fleet-gateway", "fleet-inference-shared"):
            labels = f'replica="{name}", job="{process}", instance="{process}:9808"'
            series.append({"series": f"fleet_replica_up{{{labels}}}", "values": f"{state}x15"})
            series.append({"series": f"fleet_replica_capacity_sequences{{{labels}}}", "values": f"{capacity}x15"})
        target = f'job="triton", instance="{name}:8002"'
        series.append({"series": f"up{{{target}}}", "values": f"{state}x15"})
        if state:
            series.append({"series": f'nv_inference_request_success{{{target}, model="medium", version="1"}}',
                           "values": "0+5x15"})
    return series


def test_inference_pool_alerts_fire_on_what_they_say(tmp_path: Path, promtool: str) -> None:
    """The pool's alert expressions, evaluated by promtool over pools with replicas down."""
    exprs = {r["alert"]: r["expr"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}

    def case(up: dict[str, int], expect: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
        return {"interval": "1m", "input_series": _pool_series(up),
                "promql_expr_test": [{"expr": exprs[name], "eval_time": "10m", "exp_samples": samples}
                                     for name, samples in expect.items()]}

    down = {"labels": "{}", "value": 0}
    tests = [
        # One replica of two down: named, and half the pool's sequences gone; Triton still serves.
        case({"triton-0": 1, "triton-1": 0}, {
            "FleetReplicaDown": [{"labels": '{replica="triton-1"}', "value": 0}],
            "FleetPoolCapacityLost": [{"labels": "{}", "value": 64}],
            "TritonNotReady": []}),
        # One of four down: a ticket, not a page.
        case({"triton-0": 1, "triton-1": 1, "triton-2": 0, "triton-3": 1}, {
            "FleetReplicaDown": [{"labels": '{replica="triton-2"}', "value": 0}],
            "FleetPoolCapacityLost": [],
            "TritonNotReady": []}),
        # Every replica down: the outage page (the capacity alert leaves it to that one).
        case({"triton-0": 0, "triton-1": 0}, {
            "TritonNotReady": [down, {"labels": '{job="triton"}', "value": 1}],
            "FleetPoolCapacityLost": []}),
        # All up: nothing.
        case({"triton-0": 1, "triton-1": 1}, {
            "FleetReplicaDown": [], "FleetPoolCapacityLost": [], "TritonNotReady": []}),
    ]
    spec = tmp_path / "pool-tests.yml"
    spec.write_text(yaml.safe_dump({"rule_files": [], "evaluation_interval": "1m", "tests": tests}))
    result = subprocess.run([promtool, "test", "rules", str(spec)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --- dashboard -----------------------------------------------------------------------------

def _all_panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for panel in panels:
        out.append(panel)
        out.extend(_all_panels(panel.get("panels") or []))
    return out


def test_dashboard_parses_and_every_panel_queries() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] == "fleet"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = [p for p in _all_panels(dash["panels"]) if p["type"] != "row"]
    assert panels
    ids = [p["id"] for p in _all_panels(dash["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    exprs = []
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            exprs.append(target["expr"])
    read = set().union(*(_metric_names(e) for e in exprs))
    assert read <= KNOWN_METRICS, f"panels query unknown metrics: {sorted(read - KNOWN_METRICS)}"
    for metric in ("fleet_run_latency_seconds_bucket", "fleet_step_duration_seconds_bucket",
                   "fleet_model_ttft_seconds_bucket", "fleet_tokens_in_total", "fleet_tokens_out_total",
                   "fleet_step_retries_total", "fleet_dead_letters_total", "fleet_queue_depth",
                   "fleet_queue_oldest_age_seconds", "fleet_triton_inflight_requests",
                   "nv_inference_request_success", "nv_inference_queue_duration_us",
                   # the inference pool, per replica
                   "fleet_replica_up", "fleet_replica_capacity_sequences", "fleet_replica_inflight_requests",
                   "fleet_replica_pipeline_requests", "fleet_replica_engine_waiting_requests",
                   "fleet_replica_preemptions_total",
                   # where time goes per agent, and what it costs
                   "fleet_usage_queue_seconds_total", "fleet_usage_model_seconds_total",
                   "fleet_usage_tool_seconds_total", "fleet_usage_cost_total"):
        assert metric in read, metric
    # Fleet-wide gauges come from every process: a panel takes max by their labels, never a sum
    # over processes.
    for expr in exprs:
        for name in _metric_names(expr) & {"fleet_queue_depth", "fleet_queue_oldest_age_seconds",
                                           "fleet_triton_inflight_requests"}:
            assert re.search(rf"max by \([^)]*\) \({name}", expr), expr


# --- Kubernetes ----------------------------------------------------------------------------

def test_k8s_manifests_parse_and_are_listed() -> None:
    docs = _k8s_docs()
    assert docs
    for doc in docs:
        assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], doc["__file__"]
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "fleet", (doc["__file__"], doc["metadata"]["name"])
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def test_flower_login_comes_from_the_environment_never_argv() -> None:
    flower = _services()["flower"]
    assert "basic-auth" not in " ".join(_command(flower))
    assert "FLEET_FLOWER_BASIC_AUTH" in _env_mapping(flower)["FLOWER_BASIC_AUTH"]
    container = _containers(_k8s("Deployment")["flower"])[0]
    assert not any("basic-auth" in a for a in container["args"])
    env = {e["name"]: e for e in container["env"]}
    assert env["FLOWER_BASIC_AUTH"]["valueFrom"]["secretKeyRef"]["key"] == "FLEET_FLOWER_BASIC_AUTH"


def test_k8s_workloads() -> None:
    deployments = _k8s("Deployment")
    statefulsets = _k8s("StatefulSet")
    assert {"gateway", "flower"} | WORKER_SERVICES <= set(deployments)
    assert "triton" not in deployments, "Triton runs as a StatefulSet (one stable name per replica)"
    redis = statefulsets["redis"]
    script = " ".join(_containers(redis)[0]["args"])
    assert "--appendonly yes" in script and "requirepass" in script and "--requirepass" not in script
    assert redis["spec"]["volumeClaimTemplates"]
    # Every Secret and ConfigMap a pod reads is one the manifests or the documented
    # out-of-band secrets provide.
    configmaps = set(_k8s("ConfigMap"))
    secrets = {"fleet-redis", "fleet-secrets"}
    for name, workload in {**deployments, **statefulsets}.items():
        for container in _containers(workload):
            for ref in container.get("envFrom") or []:
                assert ref["configMapRef"]["name"] in configmaps, name
            for env in container.get("env") or []:
                source = env.get("valueFrom", {}).get("secretKeyRef")
                if source:
                    assert source["name"] in secrets, name
        for volume in workload["spec"]["template"]["spec"].get("volumes") or []:
            if "configMap" in volume:
                assert volume["configMap"]["name"] in configmaps, name


def _triton_statefulset() -> dict[str, Any]:
    return _k8s("StatefulSet")["triton"]


def test_k8s_triton_is_a_statefulset_behind_a_headless_service() -> None:
    sts = _triton_statefulset()
    spec = sts["spec"]
    assert spec["replicas"] >= 1
    # Replicas load their weights side by side; a rollout replaces one pod at a time.
    assert spec["podManagementPolicy"] == "Parallel"
    assert spec.get("updateStrategy", {}).get("type", "RollingUpdate") == "RollingUpdate"
    service = _k8s("Service")[spec["serviceName"]]
    assert service["spec"]["clusterIP"] == "None", "a ClusterIP Service would pin each gRPC channel to one pod"
    assert _selects({"matchLabels": service["spec"]["selector"]}, _pod_labels(sts))
    container = _containers(sts)[0]
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]} == {n: n for n in named}
    assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert "livenessProbe" in container and "startupProbe" in container
    args = container["args"]
    assert "--model-control-mode=none" in args and not any("--load-model" in a for a in args)
    # Each pod keeps its own weights cache.
    claims = {c["metadata"]["name"]: c for c in spec["volumeClaimTemplates"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts[next(iter(claims))] == "/root/.cache/huggingface" and len(claims) == 1
    assert not _k8s("PersistentVolumeClaim"), "per-pod volumes come from volumeClaimTemplates"


def test_k8s_model_repository_is_the_configmap_of_triton_models_medium() -> None:
    """Every replica reads triton_models/medium/ from one ConfigMap, mounted as the model
    directory of a repository that holds nothing else."""
    sts = _triton_statefulset()
    container = _containers(sts)[0]
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    repo = _option(container["args"], "--model-repository")
    assert repo == "/models"
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"].startswith(repo)]
    assert mount["mountPath"] == f"{repo}/medium" and mount["readOnly"] is True and "subPath" not in mount
    source = volumes[mount["name"]]["configMap"]
    files = {item["path"]: item["key"] for item in source["items"]}
    assert files == {"config.pbtxt": "config.pbtxt", "1/model.json": "model.json", "1/model.py": "model.py"}
    data = _k8s("ConfigMap")[source["name"]]["data"]
    assert set(data) == set(files.values())
    for path, key in files.items():
        assert data[key] == (MEDIUM_DIR / path).read_text(), (
            f"ops/k8s/triton.yaml: ConfigMap {source['name']} key {key} differs from triton_models/medium/{path}: "
            "run python ops/k8s/sync_model.py")
    # A changed configuration changes the pod template, so applying it restarts the pods.
    digest = hashlib.sha256("".join((MEDIUM_DIR / path).read_text() for path in files).encode()).hexdigest()
    annotation = sts["spec"]["template"]["metadata"]["annotations"]["fleet/model-config-sha256"]
    assert annotation == digest, "ops/k8s/triton.yaml is behind triton_models/medium: run python ops/k8s/sync_model.py"


def test_k8s_pool_lists_every_triton_pod(tmp_path: Path) -> None:
    """FLEET_TRITON_REPLICAS names each pod of the StatefulSet by its stable DNS name."""
    sts = _triton_statefulset()
    spec = sts["spec"]
    ports = {p["name"]: p["containerPort"] for p in _containers(sts)[0]["ports"]}
    namespace = sts["metadata"]["namespace"]
    config = _k8s("ConfigMap")["fleet-config"]["data"]
    replicas = _replicas(config["FLEET_TRITON_REPLICAS"])
    assert len(replicas) == spec["replicas"], "scaling the StatefulSet means listing its pods in FLEET_TRITON_REPLICAS"
    for i, replica in enumerate(replicas):
        host = f"{sts['metadata']['name']}-{i}.{spec['serviceName']}.{namespace}.svc.cluster.local"
        assert replica.name == f"{sts['metadata']['name']}-{i}"
        assert replica.grpc_url == f"{host}:{ports['grpc']}"
        assert replica.metrics_url == f"http://{host}:{ports['metrics']}/metrics"
        assert replica.max_sequences is None  # read from each replica's model config
    assert not {"FLEET_TRITON_GRPC_URL", "FLEET_TRITON_HTTP_URL", "FLEET_TRITON_METRICS_URL"} & set(config)
    # The workers' Settings accept what they are given.
    values = {k[len("FLEET_"):].lower(): v for k, v in config.items() if k.startswith("FLEET_")}
    tenants = tmp_path / "tenants.json"  # the mounted fleet-tenants Secret
    tenants.write_text('{"tenants": [{"name": "search", "weight": 3, "keys": ["k"]}]}')
    values["tenants_file"] = str(tenants)
    settings = Settings(_env_file=None, **values)
    assert settings.triton_model == "medium" and settings.tenant_registry.weight("search") == 3


def test_k8s_every_pod_of_the_fleets_settings_mounts_the_tenants_file() -> None:
    """Workers need the weights (fair share), the gateway the keys and quotas, Flower and the
    batch job their settings: every pod that reads fleet-config reads the file it names."""
    path = Path(_k8s("ConfigMap")["fleet-config"]["data"]["FLEET_TENANTS_FILE"])
    cronjob = yaml.safe_load_all((ROOT / "ops" / "batch" / "cronjob.yaml").read_text())
    pods = {name: d["spec"]["template"]["spec"] for name, d in _k8s("Deployment").items()}
    pods |= {d["metadata"]["name"]: d["spec"]["jobTemplate"]["spec"]["template"]["spec"]
             for d in cronjob if d["kind"] == "CronJob"}
    readers = {name: pod for name, pod in pods.items()
               if any(ref.get("configMapRef", {}).get("name") == "fleet-config"
                      for c in pod["containers"] for ref in c.get("envFrom", []))}
    assert {"gateway", "inference-interactive", "inference-shared", "tools", "flower", "nightly-writer"} <= set(readers)
    for name, pod in readers.items():
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        mounts = {m["name"]: m for c in pod["containers"] for m in c.get("volumeMounts", [])}
        assert volumes["tenants"]["secret"]["secretName"] == "fleet-tenants", name
        assert Path(mounts["tenants"]["mountPath"]) == path.parent and mounts["tenants"]["readOnly"], name


def test_triton_podmonitor_scrapes_every_replica_as_job_triton() -> None:
    sts = _triton_statefulset()
    monitors = [m for m in _k8s("PodMonitor").values() if _selects(m["spec"]["selector"], _pod_labels(sts))]
    assert len(monitors) == 1
    monitor = monitors[0]["spec"]
    # The alert rules and the dashboard read job="triton".
    assert _pod_labels(sts)[monitor["jobLabel"]] == "triton"
    ports = {p["name"] for p in _containers(sts)[0]["ports"]}
    assert [e["port"] for e in monitor["podMetricsEndpoints"]] == ["metrics"] and "metrics" in ports


def test_k8s_worker_queues_match_routing() -> None:
    expected = _expected_queues()
    deployments = _k8s("Deployment")
    consumed: set[str] = set()
    for name in WORKER_SERVICES:
        queues = _queues_of(_containers(deployments[name])[0]["args"])
        assert queues and set(queues) <= set(expected), name
        assert queues == sorted(queues, key=expected.index), name
        assert queues == _queues_of(_command(_services()[name])), f"{name}: compose and k8s disagree"
        consumed |= set(queues)
    assert consumed == set(expected)


def test_scaled_objects_target_deployments_and_their_queues() -> None:
    deployments = _k8s("Deployment")
    scaled = _k8s("ScaledObject")
    auths = set(_k8s("TriggerAuthentication"))
    assert set(scaled) == WORKER_SERVICES
    for name, obj in scaled.items():
        assert obj["apiVersion"] == "keda.sh/v1alpha1"
        target = obj["spec"]["scaleTargetRef"]["name"]
        assert target in deployments, f"{name} scales unknown Deployment {target}"
        queues = set(_queues_of(_containers(deployments[target])[0]["args"]))
        spec = obj["spec"]
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"], name
        config = _k8s("ConfigMap")["fleet-config"]["data"]
        for trigger in spec["triggers"]:
            # KEDA asks the Sentinels for the primary, as the fleet does.
            assert trigger["type"] == "redis-sentinel"
            meta = trigger["metadata"]
            assert meta["addresses"].split(",") == config["FLEET_REDIS_SENTINELS"].split(","), name
            assert meta["sentinelMaster"] == config["FLEET_REDIS_MASTER_NAME"], name
            assert meta["listName"] in queues, f"{name}: {meta['listName']} is not consumed by {target}"
            assert int(meta["listLength"]) >= 1
            assert trigger["authenticationRef"]["name"] in auths
    assert scaled["inference-interactive"]["spec"]["minReplicaCount"] >= 1


def _pool_need() -> tuple[int, int]:
    """Sequences + pipeline of one replica, and the shared threads the k8s pool needs."""
    per_replica = int(_model_config().parameters["max_num_seqs"].string_value) + Settings(_env_file=None).pipeline_max
    return per_replica, _triton_statefulset()["spec"]["replicas"] * per_replica


def test_shared_inference_threads_cover_the_pool_and_its_pipeline() -> None:
    """Batch fills every slot of every replica plus the learned pipeline: the shared threads
    at their maximum cover exactly that (more only wait in Redis); interactive-only threads
    come on top."""
    per_replica, need = _pool_need()
    config = _k8s("ConfigMap")["fleet-config"]["data"]
    scaled = _k8s("ScaledObject")
    threads = int(config["FLEET_INFERENCE_CONCURRENCY"])
    shared_max = scaled["inference-shared"]["spec"]["maxReplicaCount"]
    assert shared_max * threads >= need > (shared_max - 1) * threads, (shared_max, threads, need)
    interactive = scaled["inference-interactive"]["spec"]
    assert interactive["maxReplicaCount"] * int(config["FLEET_INFERENCE_INTERACTIVE_CONCURRENCY"]) >= 1
    # Compose: one shared worker with every thread.
    shared = _command(_services()["inference-shared"])
    assert int(_with_defaults(_option(shared, "-c") or "")) == len(_triton_services()) * per_replica
    assert _with_defaults(_env_mapping(_services()["inference-shared"])["FLEET_INFERENCE_CONCURRENCY"]) == str(
        len(_triton_services()) * per_replica)


def _pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"]["labels"]


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def test_network_policies_let_only_fleet_pods_reach_triton_redis_and_flower() -> None:
    policies = _k8s("NetworkPolicy")
    workloads = {**_k8s("Deployment"), **_k8s("StatefulSet")}
    pods = {name: _pod_labels(w) for name, w in workloads.items()}
    deny = policies["default-deny-ingress"]["spec"]
    assert deny["podSelector"] == {} and deny["policyTypes"] == ["Ingress"] and not deny.get("ingress")

    def allowed_from(target: str, port: str | int | None = None) -> tuple[set[str], set[str], bool]:
        """Fleet pods and namespaces that may reach ``target`` (on ``port``, or on any), and
        whether anyone may."""
        pod_names: set[str] = set()
        namespaces: set[str] = set()
        anyone = False
        for policy in policies.values():
            spec = policy["spec"]
            if not spec["podSelector"] or not _selects(spec["podSelector"], pods[target]):
                continue
            for rule in spec.get("ingress") or []:
                ports = {p["port"] for p in rule.get("ports") or []}
                container_ports = {p.get("name") for c in _containers(workloads[target]) for p in c.get("ports", [])}
                assert {p for p in ports if isinstance(p, str)} <= container_ports, (policy["metadata"]["name"], ports)
                if port is not None and ports and port not in ports:
                    continue
                if not rule.get("from"):
                    anyone = True
                for peer in rule.get("from") or []:
                    if "podSelector" in peer:
                        pod_names |= {n for n, labels in pods.items() if _selects(peer["podSelector"], labels)}
                    if "namespaceSelector" in peer:
                        namespaces.add(peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"])
        return pod_names, namespaces, anyone

    triton_from, triton_ns, triton_open = allowed_from("triton")
    assert triton_from == INFERENCE_SERVICES | {"gateway"} and not triton_open
    assert triton_ns == {"monitoring"}
    # Inference workers call the model (gRPC) and their pool monitor reads each engine's state
    # (metrics); the gateway asks each replica whether it is ready.
    assert allowed_from("triton", "grpc")[0] == INFERENCE_SERVICES | {"gateway"}
    assert allowed_from("triton", "metrics")[:2] == (INFERENCE_SERVICES, {"monitoring"})
    assert allowed_from("triton", "http")[:2] == ({"gateway"}, set())
    redis_from, redis_ns, redis_open = allowed_from("redis")
    assert redis_from == set(pods) and redis_ns == {"keda"} and not redis_open  # every fleet pod, and KEDA
    assert allowed_from("redis-sentinel") == (set(pods), {"keda"}, False)
    flower_from, _, flower_open = allowed_from("flower")
    assert flower_from == set(pods) and not flower_open
    assert allowed_from("gateway")[2]  # the front door, behind its API keys
    for worker in WORKER_SERVICES:
        assert allowed_from(worker) == (set(), {"monitoring"}, False)


# --- the Triton image ---------------------------------------------------------------------

def _version(text: str) -> tuple[int, ...]:
    """``0.11.1`` -> (0, 11, 1); a pre-release suffix (``0.9.0rc1``) counts below its release."""
    parts = []
    for piece in text.split("."):
        digits = re.match(r"\d+", piece)
        parts.append(int(digits.group(0)) if digits else 0)
        if digits and digits.group(0) != piece:
            parts[-1] -= 1  # 0.9.0rc1 < 0.9.0
            break
    return tuple(parts)


def test_the_triton_image_is_pinned_once_and_its_vllm_serves_the_model() -> None:
    pin = tomllib.loads((MEDIUM_DIR / "image.toml").read_text())
    image, release = pin["image"], pin["release"]
    assert image == f"nvcr.io/nvidia/tritonserver:{release}-vllm-python-py3"
    minimum = _model_config().parameters["min_vllm_version"].string_value
    assert _version(pin["vllm"][release]) >= _version(minimum), (release, pin["vllm"][release], minimum)
    assert _version(pin["vllm"]["25.07"]) < _version(minimum) <= _version(pin["vllm"]["25.08"])  # the matrix read right
    # 1/model.py extends the backend's request classes, which exist from 25.11 on.
    assert _version(release) >= (25, 11)
    # Every deploy file names exactly the pinned image, and no other Triton image.
    services = _services()
    assert {services[name]["image"] for name in services if name.startswith("triton-")} == {image}
    assert [c["image"] for c in _containers(_triton_statefulset())] == [image]
    for path in [*ROOT.glob("compose/**/*.y*ml"), *ROOT.glob("ops/**/*.y*ml")]:
        for found in re.findall(r"nvcr\.io/nvidia/tritonserver:\S+", path.read_text()):
            assert found == image, f"{path.relative_to(ROOT)} names {found}, not the pinned {image}"


def test_the_version_reading_orders_releases() -> None:
    assert _version("0.9.0rc1") < _version("0.9.0") < _version("0.9.1") < _version("0.10.1.1") < _version("0.11.1")


# --- tracing ------------------------------------------------------------------------------

def _command_text(service: dict[str, Any]) -> str:
    command = service.get("command", "")
    return " ".join(command) if isinstance(command, list) else command


def test_every_process_the_local_stack_traces_is_traced_in_the_deploy_files() -> None:
    from fleet.ops import launch

    # What `fleet up` traces (with OTEL_* set): the workers and the gateway configure tracing
    # themselves, and Triton runs with its trace flags.
    source = {p: (ROOT / p).read_text() for p in ("fleet/steps/worker.py", "fleet/surfaces/gateway/app.py",
                                                  "fleet/surfaces/stack.py")}
    assert 'tracing.configure(settings, "worker")' in source["fleet/steps/worker.py"]
    assert 'tracing.configure(settings, "gateway")' in source["fleet/surfaces/gateway/app.py"]
    assert "launch.triton_trace_args(" in source["fleet/surfaces/stack.py"]

    # compose: every worker and the gateway get the collector's endpoint, every Triton its flags.
    services = _services()
    endpoint = _compose()["x-fleet-env"]["OTEL_EXPORTER_OTLP_ENDPOINT"]
    assert endpoint.startswith("http://otel-collector:") and "otel-collector" in services and "jaeger" in services
    fleet_processes = [n for n, s in services.items()
                       if "fleet.steps.worker:app worker" in _command_text(s) or "fleet gateway" in _command_text(s)]
    assert len(fleet_processes) >= 4
    for name in fleet_processes:
        assert services[name]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == endpoint, name
    flags = launch.triton_trace_args(endpoint + "/v1/traces")
    for name in (n for n in services if n.startswith("triton-")):
        command = services[name]["command"]
        assert command[command.index("--trace-config"):] == flags, name

    # Kubernetes: the variables in fleet-config, which every worker and the gateway load; the
    # flags on every Triton pod; the collector behind the endpoint's name.
    config = _k8s("ConfigMap")["fleet-config"]["data"]
    endpoint = config["OTEL_EXPORTER_OTLP_ENDPOINT"]
    host = endpoint.split("//", 1)[1].split(".", 1)[0]
    assert host in _k8s("Service") and host in _k8s("Deployment")
    for name, deployment in _k8s("Deployment").items():
        for container in _containers(deployment):
            args = " ".join(container.get("args", []))
            if "fleet.steps.worker:app" in args and " worker " in f" {args} " or "gateway" in args.split()[:2]:
                refs = [e["configMapRef"]["name"] for e in container.get("envFrom", []) if "configMapRef" in e]
                assert "fleet-config" in refs, name
    args = _containers(_triton_statefulset())[0]["args"]
    assert args[args.index("--trace-config"):] == launch.triton_trace_args(endpoint + "/v1/traces")
