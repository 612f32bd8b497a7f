"""Cluster files that we ship are valid: the autoscaler schema, KubeRay manifests, local scripts."""

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# RayJob / CronJob manifests; the RayService (serving) is checked in tests/test_serve.py
KUBERAY = sorted(p for p in (ROOT / "infra" / "kuberay").glob("*.yaml") if "kind: RayService" not in p.read_text())


def _cluster_yaml():
    return yaml.safe_load((ROOT / "infra" / "ray" / "cluster.yaml").read_text())


def test_cluster_yaml_validates_against_ray_autoscaler_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(_cluster_yaml())))


def test_cluster_yaml_schema_rejects_a_typo():
    """The check above could fail: a misspelt key is refused by the same schema."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = copy.deepcopy(_cluster_yaml())
    bad["idle_timeout_minute"] = bad.pop("idle_timeout_minutes")
    with pytest.raises(jsonschema.ValidationError, match="idle_timeout_minute"):
        validate_config(prepare_config(bad))


def test_cluster_yaml_holds_no_secret_and_binds_dashboard_to_loopback():
    text = (ROOT / "infra" / "ray" / "cluster.yaml").read_text()
    assert not re.search(r"(?i)aws_secret_access_key|aws_access_key_id|password", text)
    assert "--dashboard-host=127.0.0.1" in text
    gpu_types = [n for n in _cluster_yaml()["available_node_types"] if n.startswith("gpu_8x")]
    assert gpu_types, "expected 8-GPU worker node types"


def _rayjobs(doc):
    """RayJob specs in a manifest, including the one a CronJob submits through kubectl."""
    if doc.get("kind") == "RayJob":
        yield doc
    if doc.get("kind") == "CronJob":
        container = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
        script = "\n".join(container["args"])
        body = script.split("<<'YAML'", 1)[1].split("\n", 1)[1].rsplit("YAML", 1)[0]
        yield from _rayjobs(yaml.safe_load(body))


def _containers(spec):
    cluster = spec["rayClusterSpec"]
    yield from cluster["headGroupSpec"]["template"]["spec"]["containers"]
    for group in cluster["workerGroupSpecs"]:
        yield from group["template"]["spec"]["containers"]


@pytest.mark.parametrize("path", KUBERAY, ids=[p.name for p in KUBERAY])
def test_kuberay_manifests_name_existing_entry_points_and_configs(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    jobs = [job for doc in docs for job in _rayjobs(doc)]
    assert jobs, f"{path.name} defines no RayJob"
    for job in jobs:
        argv = shlex.split(job["spec"]["entrypoint"])
        assert argv[0] == "python"
        assert (ROOT / argv[1]).is_file(), f"{path.name}: entry point {argv[1]} does not exist"
        if "--config" in argv:
            cfg = argv[argv.index("--config") + 1]
            assert (ROOT / cfg).is_file(), f"{path.name}: config {cfg} does not exist"
        for container in _containers(job["spec"]):
            assert "requests" in container.get("resources", {}), f"{path.name}: {container['name']} has no requests"


def test_kuberay_manifest_overrides_are_valid_config_keys():
    from pipeline.config import load_config

    job = yaml.safe_load((ROOT / "infra" / "kuberay" / "rayjob-train.yaml").read_text())
    argv = shlex.split(job["spec"]["entrypoint"])
    cfg = argv[argv.index("--config") + 1]
    overrides = [a for a in argv[argv.index("--config") + 2 :] if "=" in a]
    loaded = load_config(ROOT / cfg, overrides)
    assert loaded.train.run_dir.startswith("s3://")
