"""docker-compose.yml and deploy/ parse and validate (no Docker engine or cluster here), and
Ray's unauthenticated dashboard / Job API is never exposed: only the API is."""

import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))
K8S_VERSION = "1.30.0"


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_compose_matches_the_compose_spec():
    out = subprocess.run(
        ["check-jsonschema", "--builtin-schema", "vendor.compose-spec", str(ROOT / "docker-compose.yml")], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_exposes_only_the_api():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "ray-head", "ray-worker", "api"} <= set(services)
    assert [name for name, s in services.items() if s.get("ports")] == ["api"]
    assert compose["networks"]["internal"]["internal"] is True
    for name in ("redis", "ray-head", "ray-worker"):
        assert services[name]["networks"] == ["internal"], name
    assert "--appendonly" in services["redis"]["command"]  # persistence
    assert "redis-data" in " ".join(services["redis"]["volumes"])
    assert "--dashboard-port=8265" in services["ray-head"]["command"]
    api_env = services["api"]["environment"]
    assert api_env["RLHF_API_RAY_ADDRESS"] == "http://ray-head:8265"
    assert api_env["RLHF_API_REDIS_URL"].startswith("redis://redis:")


def test_dockerfiles_install_the_package():
    for name in ("Dockerfile.cpu", "Dockerfile.cuda"):
        text = (ROOT / "deploy" / name).read_text()
        assert text.startswith("#") and "\nFROM " in text
        assert 'pip install ".[api]"' in text


@pytest.mark.parametrize("path", K8S, ids=lambda p: p.name)
def test_k8s_manifests_validate(path):
    for doc in docs(path):
        if doc["apiVersion"].startswith("ray.io/"):
            for template in pod_templates(doc):
                wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
                kubernetes_validate.validate(wrapped, K8S_VERSION, strict=True)
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def pod_templates(doc: dict) -> list[dict]:
    """Pod templates of a KubeRay RayCluster or RayJob (no CRD schema here: check its shape, and
    validate its pods against the core schema)."""
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in ("RayCluster", "RayJob")
    cluster = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    if doc["kind"] == "RayJob":
        assert doc["spec"]["entrypoint"].startswith("python -m orchestrator.entrypoints.run --spec ")
    head = cluster["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP", "the Ray head (dashboard, Job API) must not be exposed"
    groups = cluster.get("workerGroupSpecs", [])
    for g in groups:
        assert {"groupName", "replicas", "rayStartParams", "template"} <= set(g)
    return [head["template"], *(g["template"] for g in groups)]


def test_only_the_api_is_exposed_in_k8s():
    every = [d for p in K8S for d in docs(p)]
    for d in every:
        if d["kind"] == "Service":
            assert d["spec"].get("type", "ClusterIP") == "ClusterIP", d["metadata"]["name"]
    ingresses = [d for d in every if d["kind"] == "Ingress"]
    backends = {p["backend"]["service"]["name"] for i in ingresses for r in i["spec"]["rules"] for p in r["http"]["paths"]}
    assert backends == {"rlhf-api"}
    policies = {d["metadata"]["name"] for d in every if d["kind"] == "NetworkPolicy"}
    assert {"ray-internal-only", "redis-internal-only"} <= policies
