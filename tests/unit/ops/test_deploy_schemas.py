"""The deployment files checked against the real schemas: Kubernetes manifests with
``kubernetes-validate`` for the Kubernetes version they target, KEDA's and the Prometheus
Operator's objects against their CRDs' schemas, the compose file against the compose
specification's JSON schema.

The CRD schemas and the compose specification come from the npm registry, installed once into
``.venv/deploy-schemas`` (``@kubernetes-models/keda`` and ``@kubernetes-models/prometheus-operator``
are the CRDs' OpenAPI schemas compiled to validators; ``dclint`` ships the compose
specification's ``compose.schema.json``). Each check is also shown failing on a broken copy, so
a validator that accepts anything would be noticed.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError
from kubernetes_validate.utils import ValidationError as K8sInvalid

ROOT = Path(__file__).resolve().parents[3]
#: The Kubernetes version the manifests target (README, Kubernetes).
K8S_VERSION = "1.33.0"
#: Where the schemas from the npm registry are installed, and which.
SCHEMAS_DIR = ROOT / ".venv" / "deploy-schemas"
NPM_PACKAGES = ["@kubernetes-models/keda@2.0.0", "@kubernetes-models/prometheus-operator@6.0.0", "dclint@3.1.0"]
CRD_GROUPS = {"keda.sh": "@kubernetes-models/keda", "monitoring.coreos.com": "@kubernetes-models/prometheus-operator"}

VALIDATE_CRDS = """
import { readFileSync } from "node:fs";
const docs = JSON.parse(readFileSync(0, "utf8"));
const packages = %s;
const out = [];
for (const d of docs) {
  const [group, version] = d.apiVersion.split("/");
  try {
    const models = await import(`${packages[group]}/${group}/${version}`);
    const Model = models[d.kind];
    if (!Model) { out.push(`no schema for ${d.apiVersion} ${d.kind}`); continue; }
    new Model(d).validate();
    out.push(null);
  } catch (e) { out.push(String((e && e.message) || e)); }
}
console.log(JSON.stringify(out));
""" % json.dumps(CRD_GROUPS)


def _npm() -> str:
    found = shutil.which("npm")
    if found is None and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "nodejs", "npm"], capture_output=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        found = shutil.which("npm")
    assert found, "npm is needed to fetch the CRD and compose schemas (install Node.js and npm)"
    return found


@pytest.fixture(scope="session")
def schemas() -> Path:
    """The npm packages that hold the schemas, installed once."""
    marker = SCHEMAS_DIR / "installed.json"
    if not marker.exists() or json.loads(marker.read_text()) != NPM_PACKAGES:
        SCHEMAS_DIR.mkdir(parents=True, exist_ok=True)
        done = subprocess.run([_npm(), "install", "--no-audit", "--no-fund", "--ignore-scripts", "--prefix",
                               str(SCHEMAS_DIR), *NPM_PACKAGES], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        marker.write_text(json.dumps(NPM_PACKAGES))
    (SCHEMAS_DIR / "validate-crds.mjs").write_text(VALIDATE_CRDS)
    return SCHEMAS_DIR


def _k8s_docs() -> list[tuple[str, dict[str, Any]]]:
    paths = [p for p in sorted((ROOT / "ops" / "k8s").glob("*.yaml")) if p.name != "kustomization.yaml"]
    paths.append(ROOT / "ops" / "batch" / "cronjob.yaml")
    return [(p.relative_to(ROOT).as_posix(), d) for p in paths for d in yaml.safe_load_all(p.read_text()) if d]


def _is_crd(doc: dict[str, Any]) -> bool:
    return doc["apiVersion"].split("/")[0] in CRD_GROUPS


def _validate_crds(schemas: Path, docs: list[dict[str, Any]]) -> list[str | None]:
    out = subprocess.run(["node", str(schemas / "validate-crds.mjs")], input=json.dumps(docs), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def _k8s_errors(doc: dict[str, Any]) -> str | None:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except K8sInvalid as exc:
        return str(exc)[:500]
    return None


def test_kubernetes_manifests_match_the_target_versions_schemas():
    checked = 0
    for path, doc in _k8s_docs():
        if _is_crd(doc):
            continue
        try:
            assert _k8s_errors(doc) is None, (path, doc["kind"], doc["metadata"]["name"], _k8s_errors(doc))
        except SchemaNotFoundError:
            pytest.fail(f"{path}: {doc['apiVersion']} {doc['kind']} is not in Kubernetes {K8S_VERSION}")
        checked += 1
    assert checked >= 25
    broken = copy.deepcopy(next(d for _, d in _k8s_docs() if d["kind"] == "Deployment"))
    broken["spec"]["replicas"] = "two"
    assert _k8s_errors(broken) is not None


def test_keda_and_prometheus_operator_objects_match_their_crds(schemas):
    crds = [(path, d) for path, d in _k8s_docs() if _is_crd(d)]
    kinds = {d["kind"] for _, d in crds}
    assert {"ScaledObject", "TriggerAuthentication", "PodMonitor"} <= kinds
    errors = _validate_crds(schemas, [d for _, d in crds])
    assert [(p, d["kind"], d["metadata"]["name"], e) for (p, d), e in zip(crds, errors) if e] == []
    broken = copy.deepcopy(next(d for _, d in crds if d["kind"] == "ScaledObject"))
    broken["spec"]["maxReplicaCount"] = "many"
    assert "maxReplicaCount must be integer" in (_validate_crds(schemas, [broken])[0] or "")


def test_compose_matches_the_compose_specification(schemas):
    schema = json.loads((schemas / "node_modules" / "dclint" / "schemas" / "compose.schema.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    compose = yaml.safe_load((ROOT / "compose" / "docker-compose.yml").read_text())
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(compose)]
    assert errors == []
    broken = copy.deepcopy(compose)
    broken["services"]["gateway"]["ports"] = 6379
    broken["services"]["gateway"]["restart"] = ["always"]
    assert len(list(validator.iter_errors(broken))) >= 2
