"""deploy/: the files parse, follow their schemas where one is at hand (Ray's cluster launcher schema ships with
Ray), agree with each other (image, Ray version, package version) and keep the security defaults. No cluster is
started here."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"


def load_all(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d is not None]


def ray_clusters() -> list[tuple[str, dict]]:
    """(where, RayClusterSpec) for the RayCluster and the RayJob's cluster."""
    cluster = [d for d in load_all("kuberay/raycluster.yaml") if d["kind"] == "RayCluster"]
    job = [d for d in load_all("kuberay/rayjob.yaml") if d["kind"] == "RayJob"]
    assert len(cluster) == 1 and len(job) == 1
    return [("RayCluster", cluster[0]["spec"]), ("RayJob", job[0]["spec"]["rayClusterSpec"])]


def pod_specs(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]


def dockerfile() -> str:
    return (DEPLOY / "Dockerfile").read_text()


def dockerfile_arg(name: str) -> str:
    m = re.search(rf"^ARG {name}=(\S+)$", dockerfile(), re.M)
    assert m, f"Dockerfile: no ARG {name}"
    return m.group(1)


def package_version() -> str:
    return re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)


def test_every_file_is_there_and_parses():
    for name in ("Dockerfile", "README.md", "cluster.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml",
                 "kuberay/storage.yaml"):
        assert (DEPLOY / name).is_file(), name
    for name in ("cluster.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "kuberay/storage.yaml"):
        assert load_all(name), name


def test_the_launcher_config_passes_rays_own_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load_all("cluster.yaml")[0]
    validate_config(config)
    validate_config(prepare_config(copy.deepcopy(config)))  # merged with the provider's defaults, as `ray up` does
    assert config["head_node_type"] in config["available_node_types"]


def test_the_launcher_head_keeps_its_jobs_api_on_loopback_with_tokens():
    config = load_all("cluster.yaml")[0]
    head = " ".join(config["head_start_ray_commands"])
    workers = " ".join(config["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "--head" in head
    assert "RAY_AUTH_MODE=token ray start" in head and "RAY_AUTH_MODE=token ray start" in workers
    assert any("auth_token" in dst for dst in config["file_mounts"])
    assert "0.0.0.0" not in head


def test_kuberay_manifests_have_the_right_kinds_and_required_fields():
    for doc in load_all("kuberay/raycluster.yaml") + load_all("kuberay/rayjob.yaml"):
        assert {"apiVersion", "kind", "metadata", "spec" if doc["kind"] != "ConfigMap" else "data"} <= set(doc)
        if doc["kind"] in ("RayCluster", "RayJob"):
            assert doc["apiVersion"] == "ray.io/v1"
        else:
            assert (doc["apiVersion"], doc["kind"]) == ("v1", "ConfigMap")
    pvc = load_all("kuberay/storage.yaml")[0]
    assert (pvc["apiVersion"], pvc["kind"], pvc["spec"]["accessModes"]) == ("v1", "PersistentVolumeClaim", ["ReadWriteMany"])
    for where, spec in ray_clusters():
        head = spec["headGroupSpec"]
        assert {"rayStartParams", "template"} <= set(head), where
        for group in spec["workerGroupSpecs"]:
            assert {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"} <= set(group)
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
            assert all("nvidia.com/gpu" in c["resources"]["limits"] for c in group["template"]["spec"]["containers"])
        for pod in pod_specs(spec):
            names = {v["name"] for v in pod.get("volumes", [])}
            for c in pod["containers"]:
                assert {m["name"] for m in c.get("volumeMounts", [])} <= names, where


def test_kuberay_clusters_require_tokens_and_stay_off_public_addresses():
    for where, spec in ray_clusters():
        assert spec["authOptions"]["mode"] == "token", where
        head = spec["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", where  # never LoadBalancer / NodePort
        # documented: the dashboard binds the pod address so KubeRay's Service and submitter reach it
        assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
        assert "binds the pod's address" in (DEPLOY / "README.md").read_text()
        for pod in pod_specs(spec):
            assert pod["securityContext"]["runAsNonRoot"] is True, where
            for c in pod["containers"]:
                assert not c.get("securityContext", {}).get("privileged", False)
                assert c["securityContext"]["allowPrivilegeEscalation"] is False


def test_images_and_versions_agree_everywhere():
    import ray

    images = {c["image"] for _, spec in ray_clusters() for pod in pod_specs(spec) for c in pod["containers"]}
    images.add(load_all("cluster.yaml")[0]["docker"]["image"])
    assert len(images) == 1, images
    image = images.pop()
    assert image.rsplit(":", 1)[1] == package_version()  # the tag is the evomerge version
    assert f"-t evomerge:{package_version()}" in dockerfile()
    ray_version = dockerfile_arg("RAY_VERSION")
    assert {spec["rayVersion"] for _, spec in ray_clusters()} == {ray_version}
    assert ray_version == ray.__version__  # what the tests here ran against


def test_the_rayjob_runs_evomerge_on_its_spec():
    job = next(d for d in load_all("kuberay/rayjob.yaml") if d["kind"] == "RayJob")
    config = next(d for d in load_all("kuberay/rayjob.yaml") if d["kind"] == "ConfigMap")
    entry = job["spec"]["entrypoint"]
    assert "python -m evomerge.service.cli run /etc/evomerge/job.yaml" in entry
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
    volume = next(v for v in head["volumes"] if v["name"] == mounts["/etc/evomerge"])
    assert volume["configMap"]["name"] == config["metadata"]["name"]
    spec = yaml.safe_load(config["data"]["job.yaml"])
    assert spec["runtime"]["backend"] == "vllm" and spec["runtime"]["device"] == "cuda"
    paths = [spec["report"], spec["models"]["base"], *spec["models"]["sources"].values()]
    assert all(p.startswith("/data/") for p in paths)  # on the shared volume: the same on every pod
    assert spec["store"].startswith("/local/")  # the store: the head pod's own disk, never the network volume
    assert mounts["/local"] == "local" and {"name": "local", "emptyDir": {"sizeLimit": "20Gi"}} in head["volumes"]
    assert "cp /local/zoo-mix/store.sqlite /data/out/zoo-mix/" in entry


def test_the_image_installs_evomerge_with_vllm_and_no_remote_code():
    text = dockerfile()
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\S+$", text, re.M) and "FROM ${CUDA_IMAGE}" in text
    assert re.search(r"pip install -e \"\.\[vllm[,\]]", text)
    assert re.search(r"^USER ray$", text, re.M)  # not root at run time
    assert "HF_HUB_OFFLINE=1" in text
    for path in DEPLOY.rglob("*"):
        if path.is_file() and path.suffix != ".md":  # configs never mention it (the README says it is never set)
            assert not re.search(r"trust[_-]remote[_-]code", path.read_text(), re.I), path
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^vllm = \["vllm>=0\.6"\]$', pyproject, re.M)


def test_the_readmes_explain_running_on_a_cluster():
    top = (REPO / "README.md").read_text()
    assert "## Running on a cluster" in top and "deploy/README.md" in top
    text = (DEPLOY / "README.md").read_text()
    for needle in ("ray up deploy/cluster.yaml", "kubectl apply -f deploy/kuberay/rayjob.yaml", "RAY_AUTH_TOKEN",
                   "--no-check", "evomerge submit"):
        assert needle in text, needle


@pytest.mark.parametrize("name", ["cluster.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml"])
def test_no_secrets_are_committed(name):
    text = (DEPLOY / name).read_text()
    assert not re.search(r"(?i)(aws_secret|password|auth_token:\s*[A-Za-z0-9+/=_-]{16,})", text)  # paths are fine
