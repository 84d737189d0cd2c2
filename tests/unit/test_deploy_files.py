"""The deployment files (compose/, ops/) agree with the code and with each other.

Checks that a typo in a path, a queue name, a settings variable or a scrape target is
caught here rather than on a GPU host. Alert rules also go through ``promtool check rules``
(and the Prometheus config through ``promtool check config``): promtool from PATH, or
taken out of Debian's prometheus package; a visible skip where neither can be had.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from fleet.routing import all_queues
from fleet.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
ENV_EXAMPLE = COMPOSE_DIR / ".env.example"
PROMETHEUS_CONFIG = COMPOSE_DIR / "prometheus" / "prometheus.yml"
ALERTS = ROOT / "ops" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "ops" / "grafana" / "fleet-dashboard.json"
K8S_DIR = ROOT / "ops" / "k8s"

# FLEET_* variables that deployment files set although Settings has no field for them:
# read by the gateway (its API keys).
FLEET_VARS_OUTSIDE_SETTINGS = {"FLEET_API_KEYS"}

# Services that may publish a port on every interface: each has its own login.
AUTHENTICATED_SERVICES = {"gateway", "flower", "grafana"}

WORKER_SERVICES = {"inference-interactive", "inference-shared", "tools"}


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


# --- compose -------------------------------------------------------------------------------

def test_compose_parses_with_the_expected_services() -> None:
    services = _services()
    expected = {"redis", "triton", "gateway", "flower", "prometheus", "grafana"} | WORKER_SERVICES
    assert expected <= set(services)
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
    triton = _services()["triton"]
    args = _command(triton)
    repo = _option(args, "--model-repository")
    assert repo is not None
    # Only the production model is in the served repository: with model control off
    # (mode none) Triton loads it at start and refuses every load and unload.
    assert _option(args, "--model-control-mode") == "none"
    assert _option(args, "--load-model") is None
    mounts = {target: host for host, target in _bind_mounts(triton)}
    inside = [t for t in mounts if PurePosixPath(t).parent == PurePosixPath(repo)]
    assert inside == [f"{repo}/medium"], mounts
    assert mounts[inside[0]] == (ROOT / "triton_models" / "medium").resolve()
    assert all(v.endswith(":ro") for v in triton["volumes"] if isinstance(v, str) and "triton_models" in v)
    devices = triton["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "/v2/health/ready" in " ".join(triton["healthcheck"]["test"])


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
    assert settings.triton_grpc_url == "triton:8001"
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
    assert {n for n in seen.values()} >= {"redis", "gateway", "flower", "grafana"}
    assert all(ip == "127.0.0.1" for (ip, _), n in seen.items() if n == "redis")
    assert "ports" not in _services()["triton"], "Triton has no auth: keep it off the host's ports"


def test_redis_is_durable_and_password_protected() -> None:
    redis = _services()["redis"]
    command = " ".join(_command(redis))
    assert "--appendonly yes" in command
    # The password reaches Redis through a private config file, never its command line.
    assert "requirepass %s" in command and "umask 077" in command and "--requirepass" not in command
    assert any(str(v).endswith(":/data") for v in redis["volumes"])
    for name in ("gateway", "flower", *WORKER_SERVICES):
        url = _env_mapping(_services()[name])["FLEET_REDIS_URL"]
        assert "${REDIS_PASSWORD" in url and "@redis:6379" in url, name


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
        assert args[:4] == ["celery", "-A", "fleet.worker:app", "worker"], name
        consumed |= set(queues)
    assert consumed == set(expected)
    assert _queues_of(_command(services["inference-interactive"])) == ["llm.interactive"]
    for name in ("inference-interactive", "inference-shared"):
        assert _option(_command(services[name]), "-P") == "threads"
        env = _env_mapping(services[name])
        assert env["FLEET_TRITON_MODEL"] == "medium"
        assert env["FLEET_TRITON_GRPC_URL"] == "triton:8001"
        assert services[name]["depends_on"]["triton"]["condition"] == "service_healthy"
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
    assert {"triton", "gateway", "flower"} | WORKER_SERVICES <= scraped
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
                   "fleet_queue_oldest_age_seconds", 'up{job="triton"}', "nv_inference_"):
        assert needle in exprs, needle


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
    joined = " ".join(exprs)
    for metric in ("fleet_run_latency_seconds_bucket", "fleet_step_duration_seconds_bucket",
                   "fleet_model_ttft_seconds_bucket", "fleet_tokens_in_total", "fleet_tokens_out_total",
                   "fleet_step_retries_total", "fleet_dead_letters_total", "fleet_queue_depth",
                   "fleet_queue_oldest_age_seconds", "fleet_triton_inflight_requests",
                   "nv_inference_request_success", "nv_inference_queue_duration_us",
                   # where time goes per agent, and what it costs
                   "fleet_usage_queue_seconds_total", "fleet_usage_model_seconds_total",
                   "fleet_usage_tool_seconds_total", "fleet_usage_cost_total"):
        assert metric in joined, metric


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
    assert {"triton", "gateway", "flower"} | WORKER_SERVICES <= set(deployments)
    triton = _containers(deployments["triton"])[0]
    assert str(triton["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert "livenessProbe" in triton
    assert "--model-control-mode=none" in triton["args"] and not any("--load-model" in a for a in triton["args"])
    mount = next(m for m in triton["volumeMounts"] if m["name"] == "models")
    assert (mount["mountPath"], mount["subPath"], mount["readOnly"]) == ("/models/medium", "medium", True)
    redis = _k8s("StatefulSet")["redis"]
    script = " ".join(_containers(redis)[0]["args"])
    assert "--appendonly yes" in script and "requirepass" in script and "--requirepass" not in script
    assert redis["spec"]["volumeClaimTemplates"]
    # Every Secret and ConfigMap a pod reads is one the manifests or the documented
    # out-of-band secrets provide.
    configmaps = set(_k8s("ConfigMap"))
    secrets = {"fleet-redis", "fleet-secrets"}
    for name, workload in {**deployments, "redis": redis}.items():
        for container in _containers(workload):
            for ref in container.get("envFrom") or []:
                assert ref["configMapRef"]["name"] in configmaps, name
            for env in container.get("env") or []:
                source = env.get("valueFrom", {}).get("secretKeyRef")
                if source:
                    assert source["name"] in secrets, name


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
        for trigger in spec["triggers"]:
            assert trigger["type"] == "redis"
            meta = trigger["metadata"]
            assert meta["listName"] in queues, f"{name}: {meta['listName']} is not consumed by {target}"
            assert int(meta["listLength"]) >= 1
            assert trigger["authenticationRef"]["name"] in auths
    assert scaled["inference-interactive"]["spec"]["minReplicaCount"] >= 1


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

    def allowed_from(target: str) -> tuple[set[str], set[str], bool]:
        """Fleet pods and namespaces that may reach ``target``, and whether anyone may."""
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
                if not rule.get("from"):
                    anyone = True
                for peer in rule.get("from") or []:
                    if "podSelector" in peer:
                        pod_names |= {n for n, labels in pods.items() if _selects(peer["podSelector"], labels)}
                    if "namespaceSelector" in peer:
                        namespaces.add(peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"])
        return pod_names, namespaces, anyone

    triton_from, triton_ns, triton_open = allowed_from("triton")
    assert triton_from == {"inference-interactive", "inference-shared", "gateway"} and not triton_open
    assert triton_ns == {"monitoring"}
    redis_from, redis_ns, redis_open = allowed_from("redis")
    assert redis_from == set(pods) and redis_ns == {"keda"} and not redis_open  # every fleet pod, and KEDA
    flower_from, _, flower_open = allowed_from("flower")
    assert flower_from == set(pods) and not flower_open
    assert allowed_from("gateway")[2]  # the front door, behind its API keys
    for worker in WORKER_SERVICES:
        assert allowed_from(worker) == (set(), {"monitoring"}, False)
