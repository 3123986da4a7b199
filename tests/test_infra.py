"""Cluster manifests and container recipe: `infra/kuberay` overlays and `infra/docker/Dockerfile`.

Checks, for every overlay (cluster: `overlays/dev`, `overlays/full`, `overlays/kueue`; jobs:
`overlays/dev/jobs`, `overlays/full/jobs`):

- it builds with kustomize (`kubectl kustomize` when kubectl is installed, else the small Python
  equivalent below, which handles exactly the kustomize features these overlays use; when kubectl is
  present both are run and must agree object for object);
- every RayCluster / RayJob validates against the KubeRay v1 CRD OpenAPI schema from
  `../shared/kuberay/crds` with unknown fields rejected (the API server would drop them silently), plus
  the operator's own rules that a schema cannot express (names, clusterSelector mode, auth, autoscaler);
- every entrypoint resolves to a module whose `--help` works, and its arguments are accepted: pipeline
  configs are parsed strictly with `pipelines.config`, training commands are parsed and resolved by
  `jobs.train` itself (without running), and the GPU workers they ask for fit the cluster;
- the Ray version (RayCluster, Dockerfile base image) and the image tag agree with `pyproject.toml`,
  and the planner's default cluster size is the full overlay's.

Run:  .venv/bin/python -m pytest tests/test_infra.py
"""

from __future__ import annotations

import copy
import fnmatch
import importlib.util
import re
import resource
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
KUBERAY = REPO / "infra" / "kuberay"
DOCKERFILE = REPO / "infra" / "docker" / "Dockerfile"
CRD_DIR = REPO.parent / "shared" / "kuberay" / "crds"
CLUSTER_OVERLAYS = ("overlays/dev", "overlays/full", "overlays/kueue", "overlays/bucket")
JOB_OVERLAYS = ("overlays/dev/jobs", "overlays/full/jobs", "overlays/bucket/jobs")
BUCKET_OVERLAYS = {"overlays/bucket": "s3://breen-bucket"}  # no shared volume: every path in this bucket
PREP_STEPS = ("download", "captions", "filter", "shards", "sft-import", "report")  # pipelines.graph + report
TRAIN_STEPS = ("convert", "stage1", "stage2", "stage3")
EVAL_STEPS = ("eval",)
STEPS = (*PREP_STEPS, *TRAIN_STEPS, *EVAL_STEPS)  # run order
SHARED = "/mnt/breen"  # the shared volume's mount path in every pod (node-local scratch in the bucket overlay)


def data_root(overlay: str) -> str:
    """Where an overlay keeps inputs, datasets, checkpoints and exports: the shared volume or a bucket."""
    return BUCKET_OVERLAYS.get(cluster_overlay(overlay), SHARED)
CONFIG_MOUNT = "/etc/breen"  # the ConfigMap's mount path

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# ============================================================================ kustomize, in Python
# Exactly what the overlays use: resources (files and folders), configMapGenerator (files, behavior
# create/replace/merge, options.disableNameSuffixHash + labels), patches with a target and a JSON6902
# operation list (add, replace, remove, test) or a strategic-merge ``$patch: delete`` of the target, images (name -> newName/newTag/digest). Anything else
# fails loudly, so a new kustomize feature in the manifests cannot be silently mis-built here.
SUPPORTED_KEYS = {"apiVersion", "kind", "resources", "configMapGenerator", "patches", "images"}


class KustomizeError(ValueError):
    pass


def py_kustomize(folder: Path) -> list[dict[str, Any]]:
    k = yaml.load((folder / "kustomization.yaml").read_text(), Loader=_Loader) or {}
    unsupported = set(k) - SUPPORTED_KEYS
    if unsupported:
        raise KustomizeError(f"{folder}: kustomization keys not handled by the Python builder: {unsupported}")
    objs: list[dict[str, Any]] = []
    for res in k.get("resources", []):
        path = folder / res
        if path.is_dir():
            objs += py_kustomize(path)
        else:
            objs += [d for d in yaml.load_all(path.read_text(), Loader=_Loader) if d]
    for gen in k.get("configMapGenerator", []):
        _generate_configmap(folder, gen, objs)
    for patch in k.get("patches", []):
        if set(patch) - {"target", "patch", "path"} or "target" not in patch:
            raise KustomizeError(
                f"{folder}: only patches with a target and JSON6902 ops are handled: {patch}"
            )
        ops = yaml.load(
            patch["patch"] if "patch" in patch else (folder / patch["path"]).read_text(), Loader=_Loader
        )
        matched = [o for o in objs if _matches(o, patch["target"])]
        if not matched:
            raise KustomizeError(f"{folder}: patch target {patch['target']} matches nothing")
        if isinstance(ops, dict) and ops.get("$patch") == "delete":  # the one strategic-merge patch handled
            if set(ops) - {"$patch", "apiVersion", "kind", "metadata"} or any(
                (ops.get("kind"), ops.get("metadata", {}).get("name")) != (o["kind"], o["metadata"]["name"])
                for o in matched
            ):
                raise KustomizeError(f"{folder}: a delete patch names exactly its target: {patch}")
            objs = [o for o in objs if not any(o is m for m in matched)]
            continue
        if not isinstance(ops, list):
            raise KustomizeError(f"{folder}: strategic-merge patches are not handled: {patch}")
        for obj in matched:
            for op in ops:
                _json6902(obj, op)
    for rule in k.get("images", []):
        for obj in objs:
            _set_images(obj, rule)
    return objs


def _generate_configmap(folder: Path, gen: dict[str, Any], objs: list[dict[str, Any]]) -> None:
    if set(gen) - {"name", "files", "behavior", "options"}:
        raise KustomizeError(f"{folder}: configMapGenerator fields not handled: {gen}")
    options = gen.get("options", {})
    if not options.get("disableNameSuffixHash") or set(options) - {"disableNameSuffixHash", "labels"}:
        raise KustomizeError(f"{folder}: only disableNameSuffixHash (+ labels) generators are handled")
    data = {}
    for item in gen.get("files", []):
        key, _, src = item.partition("=") if "=" in item else (Path(item).name, "", item)
        data[key] = (folder / src).read_text()
    cm: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": gen["name"]},
        "data": data,
    }
    if options.get("labels"):
        cm["metadata"]["labels"] = dict(options["labels"])
    existing = [
        i for i, o in enumerate(objs) if o["kind"] == "ConfigMap" and o["metadata"]["name"] == gen["name"]
    ]
    behavior = gen.get("behavior", "create")
    if behavior == "create":
        if existing:
            raise KustomizeError(f"{folder}: ConfigMap {gen['name']} already exists")
        objs.append(cm)
    elif behavior in ("replace", "merge"):
        if not existing:
            raise KustomizeError(f"{folder}: ConfigMap {gen['name']} to {behavior} does not exist")
        if behavior == "merge":
            old = objs[existing[0]]
            cm["data"] = {**old.get("data", {}), **data}
            cm["metadata"]["labels"] = {
                **old["metadata"].get("labels", {}),
                **cm["metadata"].get("labels", {}),
            }
        objs[existing[0]] = cm
    else:
        raise KustomizeError(f"{folder}: unknown behavior {behavior!r}")


def _matches(obj: dict[str, Any], target: dict[str, Any]) -> bool:
    if set(target) - {"kind", "name", "group", "version"}:
        raise KustomizeError(f"patch target fields not handled: {target}")
    group, _, version = obj["apiVersion"].rpartition("/")
    want = {"kind": obj["kind"], "name": obj["metadata"]["name"], "group": group, "version": version}
    return all(want[k] == v for k, v in target.items())


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise KustomizeError(f"JSON pointer must start with '/': {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _json6902(doc: dict[str, Any], op: dict[str, Any]) -> None:
    *parents, last = _pointer(op["path"])
    node: Any = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    kind = op["op"]
    if isinstance(node, list):
        index = len(node) if last == "-" else int(last)
        if kind == "add":
            node.insert(index, copy.deepcopy(op["value"]))
        elif kind == "replace":
            node[index] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del node[index]
        elif kind == "test":
            if node[index] != op["value"]:
                raise KustomizeError(f"test failed at {op['path']}: {node[index]!r} != {op['value']!r}")
        else:
            raise KustomizeError(f"JSON6902 op not handled: {kind}")
        return
    if kind in ("replace", "remove", "test") and last not in node:
        raise KustomizeError(f"{kind} {op['path']}: no such field")
    if kind in ("add", "replace"):
        node[last] = copy.deepcopy(op["value"])
    elif kind == "remove":
        del node[last]
    elif kind == "test":
        if node[last] != op["value"]:
            raise KustomizeError(f"test failed at {op['path']}: {node[last]!r} != {op['value']!r}")
    else:
        raise KustomizeError(f"JSON6902 op not handled: {kind}")


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """'reg:5000/name:tag@sha256:x' -> ('reg:5000/name', 'tag', 'sha256:x')."""
    name, _, digest = image.partition("@")
    tag = None
    if ":" in name.rsplit("/", 1)[-1]:
        name, tag = name.rsplit(":", 1)
    return name, tag, digest or None


def _set_images(node: Any, rule: dict[str, Any]) -> None:
    if isinstance(node, list):
        for item in node:
            _set_images(item, rule)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key in ("containers", "initContainers") and isinstance(value, list):
            for c in value:
                if isinstance(c, dict) and isinstance(c.get("image"), str):
                    name, tag, digest = split_image(c["image"])
                    if name == rule["name"]:
                        name = rule.get("newName", name)
                        tag = str(rule["newTag"]) if "newTag" in rule else tag
                        digest = rule.get("digest", digest)
                        c["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
        _set_images(value, rule)


def kubectl_kustomize(folder: Path) -> list[dict[str, Any]]:
    out = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {folder} failed:\n{out.stderr}"
    return [d for d in yaml.load_all(out.stdout, Loader=_Loader) if d]


@cache
def _build(overlay: str) -> tuple[str, list[dict[str, Any]]]:
    folder = KUBERAY / overlay
    if shutil.which("kubectl"):
        return "kubectl kustomize", kubectl_kustomize(folder)
    return "python kustomize", py_kustomize(folder)


def build(overlay: str) -> list[dict[str, Any]]:
    return copy.deepcopy(_build(overlay)[1])


def by_key(objs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for o in objs:
        key = (o["kind"], o["metadata"]["name"])
        assert key not in out, f"duplicate object {key}"
        out[key] = o
    return out


def of_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def cluster_overlay(job_overlay: str) -> str:
    return job_overlay.rsplit("/jobs", 1)[0]


# ============================================================================ building
@pytest.mark.parametrize("overlay", CLUSTER_OVERLAYS + JOB_OVERLAYS)
def test_overlay_builds(overlay):
    objs = build(overlay)
    keys = by_key(objs)  # no duplicates
    kinds = {k for k, _ in keys}
    if overlay in BUCKET_OVERLAYS:
        assert kinds == {"RayCluster", "ConfigMap", "NetworkPolicy"}, kinds  # no volume claim
        assert len(of_kind(objs, "RayCluster")) == 1
    elif overlay in CLUSTER_OVERLAYS:
        assert kinds == {"RayCluster", "PersistentVolumeClaim", "ConfigMap", "NetworkPolicy"}, kinds
        assert len(of_kind(objs, "RayCluster")) == 1
    else:
        assert kinds == {"RayJob"}, kinds
        steps = {o["metadata"]["labels"]["breen/step"] for o in objs}
        assert steps == set(STEPS), steps
        for o in objs:  # the label selector in docs/cluster.md picks exactly one job per step
            assert o["metadata"]["name"] == "breen-" + o["metadata"]["labels"]["breen/step"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed: nothing to compare with")
@pytest.mark.parametrize("overlay", CLUSTER_OVERLAYS + JOB_OVERLAYS)
def test_python_kustomize_matches_kubectl(overlay):
    assert by_key(py_kustomize(KUBERAY / overlay)) == by_key(kubectl_kustomize(KUBERAY / overlay))


def test_python_kustomize_rejects_what_it_does_not_handle(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnamePrefix: x-\n")
    with pytest.raises(KustomizeError, match="namePrefix"):
        py_kustomize(tmp_path)
    doc = {"a": [1, 2], "b": {"c": 1}}
    _json6902(doc, {"op": "add", "path": "/a/-", "value": 3})
    _json6902(doc, {"op": "replace", "path": "/b/c", "value": 2})
    _json6902(doc, {"op": "test", "path": "/a/2", "value": 3})
    assert doc == {"a": [1, 2, 3], "b": {"c": 2}}
    with pytest.raises(KustomizeError):
        _json6902(doc, {"op": "test", "path": "/b/c", "value": 1})
    assert split_image("reg:5000/breen:0.1.0@sha256:ab") == ("reg:5000/breen", "0.1.0", "sha256:ab")


# ============================================================================ KubeRay CRD schemas
def _closed(schema: Any) -> Any:
    """Copy of an OpenAPI schema where objects with `properties` reject undeclared keys."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@cache
def crd_validator(kind: str):
    if not CRD_DIR.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRD_DIR} (clone the repo next to shared/ to run this check)")
    from jsonschema import Draft7Validator

    path = CRD_DIR / {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}[kind]
    crd = yaml.load(path.read_text(), Loader=_Loader)
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return Draft7Validator(_closed(version["schema"]["openAPIV3Schema"]))


def schema_errors(obj: dict[str, Any]) -> list[str]:
    validator = crd_validator(obj["kind"])
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


@pytest.mark.parametrize("overlay", CLUSTER_OVERLAYS + JOB_OVERLAYS)
def test_ray_objects_validate_against_crds(overlay):
    objs = [o for o in build(overlay) if o["apiVersion"] == "ray.io/v1"]
    assert objs
    for obj in objs:
        assert obj["kind"] in ("RayCluster", "RayJob")
        errors = schema_errors(obj)
        assert not errors, f"{obj['kind']}/{obj['metadata']['name']} in {overlay}:\n" + "\n".join(errors)
        assert set(obj["metadata"]) <= {"name", "labels", "annotations"}


def test_schema_check_catches_typos_and_wrong_types():
    cluster = of_kind(build("overlays/full"), "RayCluster")[0]
    bad = copy.deepcopy(cluster)
    bad["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3  # misspelt: the API server would drop it
    assert any("maxReplica" in e for e in schema_errors(bad))
    bad = copy.deepcopy(cluster)
    bad["spec"]["workerGroupSpecs"][1]["minReplicas"] = "0"
    assert any("minReplicas" in e for e in schema_errors(bad))
    bad = copy.deepcopy(cluster)
    bad["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    assert any("volumeMount" in e for e in schema_errors(bad))
    job = of_kind(build("overlays/full/jobs"), "RayJob")[0]
    bad = copy.deepcopy(job)
    bad["spec"]["shutdownAfterJobFinish"] = True
    assert any("shutdownAfterJobFinish" in e for e in schema_errors(bad))


DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def _pod_specs(cluster: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    spec = cluster["spec"]
    return [("head", spec["headGroupSpec"]["template"]["spec"])] + [
        (g["groupName"], g["template"]["spec"]) for g in spec["workerGroupSpecs"]
    ]


def _gpus(pod: dict[str, Any]) -> int:
    c = pod["containers"][0]["resources"]
    return int(c.get("limits", {}).get("nvidia.com/gpu", 0))


def _cpus(pod: dict[str, Any]) -> float:
    value = str(pod["containers"][0]["resources"]["limits"]["cpu"])
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


@pytest.mark.parametrize("overlay", CLUSTER_OVERLAYS)
def test_raycluster_operator_rules(overlay):
    """KubeRay's own validation (ValidateRayClusterSpec) and what the cluster needs to work."""
    objs = build(overlay)
    (cluster,) = of_kind(objs, "RayCluster")
    spec, name = cluster["spec"], cluster["metadata"]["name"]
    assert DNS1035.match(name) and len(name) <= 53
    if spec.get("authOptions", {}).get("mode", "token" if "authOptions" in spec else "disabled") == "token":
        assert _version_tuple(spec["rayVersion"]) >= (2, 52, 0), "token auth needs Ray >= 2.52"
    autoscaler_v2 = (
        spec.get("enableInTreeAutoscaling") and spec.get("autoscalerOptions", {}).get("version") == "v2"
    )
    groups = spec["workerGroupSpecs"]
    assert len({g["groupName"] for g in groups}) == len(groups)
    pvcs = {o["metadata"]["name"] for o in of_kind(objs, "PersistentVolumeClaim")}
    configmaps = {o["metadata"]["name"] for o in of_kind(objs, "ConfigMap")}
    for group, pod in _pod_specs(cluster):
        params = (
            spec["headGroupSpec"] if group == "head" else next(g for g in groups if g["groupName"] == group)
        )
        start = params.get("rayStartParams", {})
        assert not (set(start) & {"num-cpus", "num-gpus", "memory", "resources"} and params.get("resources"))
        assert "labels" not in start
        if autoscaler_v2:
            assert pod.get("restartPolicy", "Never") == "Never"
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        res = pod["containers"][0]["resources"]
        assert res["requests"] == res["limits"], f"{group}: requests should equal limits (guaranteed QoS)"
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        assert set(mounts.values()) <= set(volumes), f"{group}: a volumeMount names no volume"
        if overlay in BUCKET_OVERLAYS:  # node-local scratch (the fetch cache), credentials from the Secret
            assert "emptyDir" in volumes[mounts[SHARED]] and "persistentVolumeClaim" not in volumes[mounts[SHARED]]
            env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
            assert env["BREEN_CACHE"].startswith(SHARED + "/")
            assert {"secretRef": {"name": "breen-object-store", "optional": True}} in pod["containers"][0]["envFrom"]
        else:
            assert volumes[mounts[SHARED]]["persistentVolumeClaim"]["claimName"] in pvcs
        assert volumes[mounts[CONFIG_MOUNT]]["configMap"]["name"] in configmaps
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        if group == "head":
            assert _gpus(pod) == 0 and start.get("num-cpus") == "0", "the head runs no tasks and has no GPU"
        else:
            g = next(g for g in groups if g["groupName"] == group)
            assert 0 <= g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"]
            if _gpus(pod):
                assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
                    "tolerations"
                ]
                assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"]
    for pvc in of_kind(objs, "PersistentVolumeClaim"):
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "every pod mounts the volume read-write"


def test_cluster_sizes():
    """dev: 1 GPU node; full: 64 GPUs (8 x 8) and 256 CPU cores for the data steps."""
    for overlay, gpu_nodes, gpus, cpu_cores in (("overlays/dev", 1, 1, 16), ("overlays/full", 8, 64, 256)):
        (cluster,) = of_kind(build(overlay), "RayCluster")
        groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
        assert set(groups) == {"cpu", "gpu"}
        gpu, cpu = groups["gpu"], groups["cpu"]
        assert gpu["maxReplicas"] == gpu_nodes
        assert gpu["maxReplicas"] * _gpus(gpu["template"]["spec"]) == gpus
        assert _gpus(cpu["template"]["spec"]) == 0
        assert cpu["maxReplicas"] * _cpus(cpu["template"]["spec"]) == cpu_cores
        assert gpu["minReplicas"] == cpu["minReplicas"] == 0, "workers exist only while a job needs them"


@pytest.mark.parametrize("overlay", JOB_OVERLAYS)
def test_rayjob_operator_rules(overlay):
    """ValidateRayJobSpec rules, the CEL rules the schema check skips, and our clusterSelector rules."""
    clusters = {o["metadata"]["name"] for o in of_kind(build(cluster_overlay(overlay)), "RayCluster")}
    for job in of_kind(build(overlay), "RayJob"):
        spec, name = job["spec"], job["metadata"]["name"]
        assert DNS1035.match(name) and len(name) <= 47, name
        assert spec["entrypoint"].strip()
        assert not (
            spec.get("shutdownAfterJobFinishes") and spec.get("deletionStrategy", {}).get("deletionRules")
        )
        assert ("clusterSelector" in spec) != ("rayClusterSpec" in spec), f"{name}: one of the two"
        selector = spec["clusterSelector"]
        assert selector.get("ray.io/cluster") in clusters, f"{name}: selects no RayCluster of the overlay"
        assert not spec.get("suspend"), "clusterSelector mode cannot suspend"
        assert spec.get("submissionMode", "K8sJobMode") in ("K8sJobMode", "HTTPMode")
        assert "shutdownAfterJobFinishes" not in spec, "the shared cluster must outlive the job"
        # A KubeRay retry (spec.backoffLimit) deletes the RayJob's cluster, here the shared one.
        assert "backoffLimit" not in spec, f"{name}: no RayJob-level retries in clusterSelector mode"
        if "runtimeEnvYAML" in spec:
            assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)


_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def _bytes(quantity: str) -> int:
    """A Kubernetes memory quantity (binary suffixes, as the manifests use) in bytes."""
    for suffix, factor in _UNITS.items():
        if quantity.endswith(suffix):
            return int(float(quantity[: -len(suffix)]) * factor)
    return int(quantity)


@pytest.mark.parametrize("overlay", CLUSTER_OVERLAYS)
def test_object_store_and_shm_follow_each_pods_memory(overlay):
    """Every group: object-store-memory = 1/4 of the pod's memory limit, /dev/shm = 30% of it rounded up
    to a GiB (Ray would otherwise size its store from whatever /dev/shm offers)."""
    (cluster,) = of_kind(build(overlay), "RayCluster")
    spec = cluster["spec"]
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    for name, group in groups:
        pod = group["template"]["spec"]
        memory = _bytes(pod["containers"][0]["resources"]["limits"]["memory"])
        store = int(group["rayStartParams"]["object-store-memory"])
        shm = next(v for v in pod["volumes"] if v["name"] == "shm")["emptyDir"]["sizeLimit"]
        assert store == memory // 4, f"{overlay} {name}: object store {store} != {memory} / 4"
        assert _bytes(shm) == -(-3 * memory // 10 // 2**30) * 2**30, f"{overlay} {name}: /dev/shm {shm}"
        assert _bytes(shm) > store, f"{overlay} {name}: /dev/shm must hold the object store"


@pytest.mark.parametrize("overlay", JOB_OVERLAYS)
def test_every_rayjob_has_a_deadline_and_submitter_resources(overlay):
    for job in of_kind(build(overlay), "RayJob"):
        spec, name = job["spec"], job["metadata"]["name"]
        assert 3600 <= spec["activeDeadlineSeconds"] <= 7 * 86400, name
        pod = spec["submitterPodTemplate"]["spec"]
        (container,) = pod["containers"]
        res = container["resources"]
        assert set(res) == {"requests", "limits"} and {"cpu", "memory"} <= set(res["requests"]), name
        assert container["image"] == job_image(overlay), f"{name}: submitter image follows the overlay"
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["restartPolicy"] == "Never"
    from jobs import plan

    walls = {p.name: p.wall_s for p in plan.plan(plan.Assumptions())}  # the full overlay's sizes
    phase_of = {"download": "download", "captions": "filter", "filter": "filter", "shards": "teacher",
                "sft-import": "sft_teacher", "convert": "convert", "stage1": "stage1", "stage2": "stage2",
                "stage3": "stage3"}  # fmt: skip
    for job in of_kind(build(overlay), "RayJob"):
        step = job["metadata"]["labels"]["breen/step"]
        if step in phase_of:  # at least twice the planned wall time of the full overlay
            assert job["spec"]["activeDeadlineSeconds"] >= 2 * walls[phase_of[step]], step


def job_image(overlay: str) -> str:
    (cluster,) = of_kind(build(cluster_overlay(overlay)), "RayCluster")
    return cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]


@pytest.mark.parametrize("overlay", CLUSTER_OVERLAYS)
def test_download_pods_cannot_reach_private_or_metadata_addresses(overlay):
    """The NetworkPolicy selects the pods that run download tasks (the CPU group) and no other, allows
    public egress, Ray's own traffic and DNS, and excludes every range the download guard refuses."""
    import ipaddress

    objs = build(overlay)
    (policy,) = of_kind(objs, "NetworkPolicy")
    (cluster,) = of_kind(objs, "RayCluster")
    selector = policy["spec"]["podSelector"]["matchLabels"]
    selected = [
        name for name, pod in _pod_templates(cluster) if selector.items() <= pod["metadata"]["labels"].items()
    ]
    assert selected == ["cpu"], selected
    assert policy["spec"]["policyTypes"] == ["Egress"]
    blocks = [p["ipBlock"] for rule in policy["spec"]["egress"] for p in rule["to"] if "ipBlock" in p]
    assert {b["cidr"] for b in blocks} == {"0.0.0.0/0", "::/0"}
    excluded = [ipaddress.ip_network(e) for b in blocks for e in b["except"]]
    for addr in ("10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "127.0.0.1",
                 "224.0.0.1", "fd00::1", "fe80::1", "::ffff:10.0.0.1", "::1"):  # fmt: skip
        ip = ipaddress.ip_address(addr)
        assert any(ip in net for net in excluded), f"{addr} is reachable from the download pods"
    for addr in ("8.8.8.8", "151.101.1.69", "2606:4700::1111"):
        ip = ipaddress.ip_address(addr)
        assert not any(ip in net for net in excluded), f"public {addr} is blocked"
    peers = [
        p
        for rule in policy["spec"]["egress"]
        for p in rule["to"]
        if "podSelector" in p and "namespaceSelector" not in p
    ]
    assert peers and all(
        p["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "breen"} for p in peers
    )
    dns = [r for r in policy["spec"]["egress"] if any(p.get("port") == 53 for p in r.get("ports", []))]
    assert dns, "cluster DNS must stay reachable"


def _pod_templates(cluster: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    spec = cluster["spec"]
    return [("head", spec["headGroupSpec"]["template"])] + [
        (g["groupName"], g["template"]) for g in spec["workerGroupSpecs"]
    ]


def test_kueue_overlay_queues_the_cluster_not_the_jobs():
    (cluster,) = of_kind(build("overlays/kueue"), "RayCluster")
    (full,) = of_kind(build("overlays/full"), "RayCluster")
    assert cluster["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "breen"
    assert cluster["metadata"]["annotations"] == {"kueue.x-k8s.io/elastic-job": "true"}
    assert cluster["spec"]["suspend"] is True, "created suspended: Kueue starts it on admission"
    assert cluster["spec"]["enableInTreeAutoscaling"] is True, "elastic: each scale-up is admitted as a slice"
    rest = copy.deepcopy(cluster)
    del (
        rest["metadata"]["labels"]["kueue.x-k8s.io/queue-name"],
        rest["metadata"]["annotations"],
        rest["spec"]["suspend"],
    )
    assert rest == full, "otherwise the full overlay"


# ============================================================================ entrypoints
def entrypoints() -> list[tuple[str, str, list[str]]]:
    """(job overlay, RayJob name, argv) of every RayJob."""
    out = []
    for overlay in JOB_OVERLAYS:
        for job in of_kind(build(overlay), "RayJob"):
            out.append((overlay, job["metadata"]["name"], shlex.split(job["spec"]["entrypoint"])))
    return out


def module_of(argv: list[str]) -> str:
    assert argv[:2] == ["python", "-m"] and len(argv) > 2, (
        f"entrypoint must be `python -m MODULE ...`: {argv}"
    )
    return argv[2]


def _missing(module: str) -> bool:
    return importlib.util.find_spec(module) is None


def test_entrypoint_modules_resolve_and_help_works():
    modules = sorted({module_of(argv) for _, _, argv in entrypoints()})
    missing = [m for m in modules if _missing(m)]
    assert not missing, f"entrypoint modules that do not exist: {missing}"
    procs = {
        m: subprocess.Popen(
            [sys.executable, "-m", m, "--help"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for m in modules
    }
    for m, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"python -m {m} --help failed:\n{err[-3000:]}"
        assert "usage" in out.lower(), f"python -m {m} --help printed no usage"


# Every command a user runs: `--help` answers in under a second in a fresh process, names the module it
# runs as, and imports none of the heavy libraries (those load only once a command has checked its inputs).
ENTRYPOINTS = ("pipelines.prepare", "pipelines.download", "pipelines.captions", "pipelines.filter",
               "pipelines.teacher", "pipelines.sft_import", "pipelines.report", "pipelines.verify",
               "pipelines.synthetic", "jobs.train", "jobs.plan", "jobs.eval", "jobs.tiny", "breen.generate",
               "breen.convert", "breen.envlock")  # fmt: skip
HEAVY = ("torch", "ray", "transformers", "deepspeed", "open_clip")


def test_every_entrypoint_is_listed():
    # a module with a main guard (`pipelines/verify.py`: pipelines.verify), or a package with a `__main__.py`
    # that has one (`pipelines/synthetic/__main__.py`: pipelines.synthetic)
    files = [p for pkg in ("breen", "jobs", "pipelines") for p in (*(REPO / pkg).glob("*.py"),
                                                                   *(REPO / pkg).glob("*/__main__.py"))]  # fmt: skip
    found = {f"{p.parent.parent.name}.{p.parent.name}" if p.name == "__main__.py" else f"{p.parent.name}.{p.stem}"
             for p in files if 'if __name__ == "__main__":' in p.read_text()}  # fmt: skip
    assert found == set(ENTRYPOINTS)


@pytest.mark.parametrize("module", ENTRYPOINTS)
def test_help_is_fast_names_the_module_and_imports_no_heavy_library(module):
    probe = (
        "import contextlib, io, runpy, sys\n"
        f"sys.argv = [{module!r}, '--help']\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    try:\n"
        f"        runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n"
        "    except SystemExit as e:\n"
        "        assert e.code in (0, None), e.code\n"
        "print(out.getvalue().splitlines()[0])\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    usage, heavy = done.stdout.strip().splitlines()[-2:]
    assert usage.startswith(f"usage: python -m {module} "), usage
    assert heavy == "[]", f"python -m {module} --help imports {heavy}"
    # CPU seconds (user + system) of the child, the best of three: what the command costs whatever else
    # the machine runs (wall time on an idle machine is within a few percent of it: 0.3-0.6 s here)
    seconds = []
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, check=True, timeout=60)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        seconds.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    assert min(seconds) < 1.0, f"python -m {module} --help took {min(seconds):.2f} CPU seconds at best"


def configmap_file(job_overlay: str, path: str) -> str:
    """The content a pod sees at `path` under the ConfigMap mount, from the matching cluster overlay."""
    assert path.startswith(CONFIG_MOUNT + "/"), f"config {path} is not in the ConfigMap mount {CONFIG_MOUNT}"
    (cm,) = of_kind(build(cluster_overlay(job_overlay)), "ConfigMap")
    key = path[len(CONFIG_MOUNT) + 1 :]
    assert key in cm["data"], f"{path}: no key {key!r} in ConfigMap {cm['metadata']['name']}"
    return cm["data"][key]


def prep_config(job_overlay: str, path: str):
    """Parse a cluster pipeline config strictly (types, unknown keys, ranges; input files live on the
    cluster's volume, so their existence is not checked here)."""
    from pipelines.config import PrepareConfig, apply_preset, from_dict, validate

    cfg = from_dict(PrepareConfig, yaml.safe_load(configmap_file(job_overlay, path)))
    apply_preset(cfg.filter)
    validate(cfg, path)
    return cfg


def _paths_in(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value] if value.startswith("/") or "://" in value else []  # paths and storage URIs
    if isinstance(value, dict):
        return [p for v in value.values() for p in _paths_in(v)]
    if isinstance(value, list):
        return [p for v in value for p in _paths_in(v)]
    return []


@pytest.mark.parametrize("overlay", JOB_OVERLAYS)
def test_pipeline_entrypoints_and_configs(overlay):
    import dataclasses

    configs = set()
    for job_overlay, name, argv in entrypoints():
        if job_overlay != overlay or not module_of(argv).startswith("pipelines."):
            continue
        module, args = module_of(argv), argv[3:]
        if module == "pipelines.report":
            assert len(args) == 1 and args[0].startswith(data_root(overlay) + "/"), f"{name}: report DIR expected"
            configs.add(("report", args[0]))
            continue
        # `cli.step_main`: --config FILE and --set KEY=VALUE pairs only.
        assert args[0] == "--config" and len(args) % 2 == 0, f"{name}: {args}"
        assert all(a == "--set" for a in args[2::2]), f"{name}: {args}"
        cfg = prep_config(overlay, args[1])
        configs.add(("config", cfg.output_dir))
        assert cfg.input.synthetic is None, "the cluster config must read real inputs"
        assert cfg.teacher.weights and cfg.teacher.device == "cuda"
        for p in _paths_in(dataclasses.asdict(cfg)):
            assert p.startswith(data_root(overlay) + "/"), f"{name}: {p} is not in {data_root(overlay)}"
        (cluster,) = of_kind(build(cluster_overlay(overlay)), "RayCluster")
        gpu = next(g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu")
        gpu_pod = gpu["template"]["spec"]
        total_gpus = gpu["maxReplicas"] * _gpus(gpu_pod)
        t = cfg.teacher
        assert t.num_actors * t.num_gpus_per_actor <= total_gpus, (
            "teacher actors need more GPUs than the cluster has"
        )
        assert t.cpus_per_actor * _gpus(gpu_pod) / t.num_gpus_per_actor <= _cpus(gpu_pod)
    # every step reads the same output_dir, and report reads it too
    dirs = {d for _, d in configs}
    assert len(dirs) == 1, f"steps disagree on the output folder: {configs}"


def _train_configs(argv: list[str]):
    """Parse a `python -m jobs.train ...` entrypoint with jobs.train itself and return the stage configs
    it would run (`jobs.driver.run_stage` is replaced, nothing runs; `check_inputs` too: the data lives on
    the cluster's volume, not here)."""
    from jobs import driver, launch

    captured = []
    original = driver.run_stage, driver.check_inputs
    driver.run_stage = lambda cfg, *a, **k: captured.append(cfg) or {"validation": None}
    driver.check_inputs = lambda cfg: driver.validate(cfg)
    try:
        rc = launch.main(argv[3:])
    finally:
        driver.run_stage, driver.check_inputs = original
    assert rc == 0, f"jobs.train rejected {argv}"
    return captured


@pytest.mark.parametrize("overlay", JOB_OVERLAYS)
def test_training_entrypoints_resolve_and_fit(overlay):
    jobs = {name: argv for ov, name, argv in entrypoints() if ov == overlay}
    prep = prep_config(overlay, jobs["breen-download"][jobs["breen-download"].index("--config") + 1])
    (cluster,) = of_kind(build(cluster_overlay(overlay)), "RayCluster")
    gpu = next(g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu")
    gpu_pod = gpu["template"]["spec"]
    per_node, nodes = _gpus(gpu_pod), gpu["maxReplicas"]
    convert = jobs["breen-convert"]
    assert module_of(convert) == "breen.convert"
    init_dir = convert[convert.index("--out") + 1]
    root = data_root(overlay)
    assert init_dir.startswith(root + "/") and convert[convert.index("--qwen") + 1].startswith(root + "/")
    recipe = {"stage1": 64, "stage2": 64, "stage3": 32}
    expected_workers = {"overlays/full/jobs": recipe, "overlays/bucket/jobs": recipe}.get(overlay)
    export = {}
    for stage in ("stage1", "stage2", "stage3"):
        argv = jobs[f"breen-{stage}"]
        assert module_of(argv) == "jobs.train"
        (cfg,) = _train_configs(argv)
        assert cfg.stage == stage
        s = cfg.scale
        assert s.use_gpu and s.precision == "bf16"
        if expected_workers:
            assert s.num_workers == expected_workers[stage], f"{stage}: {s.num_workers} GPU workers"
        assert s.num_workers <= per_node * nodes, (
            f"{stage}: {s.num_workers} GPUs > cluster's {per_node * nodes}"
        )
        workers_per_node = min(s.num_workers, per_node)
        assert workers_per_node * s.cpus_per_worker + cfg.data.encode_cpus <= _cpus(gpu_pod), (
            f"{stage}: Ray Train workers leave no CPU for the ingest on a GPU node"
        )
        want = [f"{prep.output_dir}/sft_shards"] if stage == "stage3" else [f"{prep.output_dir}/shards"]
        assert cfg.data.paths == want, f"{stage} reads {cfg.data.paths}, the prep config writes {want}"
        assert cfg.output_dir.startswith(root + "/"), f"checkpoints must live in {root}"
        expected_init = init_dir if stage == "stage1" else export[f"stage{int(stage[-1]) - 1}"]
        assert cfg.model.init_from == expected_init, f"{stage} starts from {cfg.model.init_from}"
        export[stage] = str(cfg.export_dir)


def _lmms_eval_tasks() -> set[str]:
    """Task names of lmms-eval's own task folders (`task:` lines of its YAML files), without indexing them."""
    import lmms_eval.tasks

    names = set()
    for path in Path(lmms_eval.tasks.__file__).parent.rglob("*.yaml"):
        m = re.search(r"^task:\s*[\"']?([\w.-]+)", path.read_text(errors="replace"), flags=re.M)
        if m:
            names.add(m.group(1))
    return names


@pytest.mark.parametrize("overlay", JOB_OVERLAYS)
def test_eval_entrypoint_reads_the_stage3_export(overlay):
    from jobs import eval as jeval

    jobs = {name: argv for ov, name, argv in entrypoints() if ov == overlay}
    argv = jobs["breen-eval"]
    assert module_of(argv) == "jobs.eval"
    args = jeval.build_parser().parse_args(argv[3:])
    (stage3,) = _train_configs(jobs["breen-stage3"])
    assert args.model == str(stage3.export_dir), f"evaluates {args.model}, stage 3 exports {stage3.export_dir}"
    tasks = args.tasks.split(",")
    unknown = set(tasks) - _lmms_eval_tasks() - set(jeval.BUILTIN_TASKS)
    assert not unknown, f"tasks lmms-eval does not have: {unknown}"
    assert args.device == "cuda" and args.dtype == "bfloat16"
    (job,) = [j for j in of_kind(build(overlay), "RayJob") if j["metadata"]["name"] == "breen-eval"]
    assert job["spec"]["entrypointNumGpus"] == 1


# ============================================================================ versions
@cache
def pyproject() -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli", reason="Python 3.10 needs tomli to read pyproject.toml")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def ray_pin() -> str:
    pins = set()
    for extra in pyproject()["project"]["optional-dependencies"].values():
        for req in extra:
            m = re.fullmatch(r"ray(\[[^\]]*\])?==([\w.]+)", req.replace(" ", ""))
            if m:
                pins.add(m.group(2))
    assert len(pins) == 1, f"pyproject.toml pins ray inconsistently: {pins}"
    return pins.pop()


def dockerfile_from() -> re.Match:
    froms = re.findall(r"^FROM\s+(\S+)", DOCKERFILE.read_text(), flags=re.M)
    assert len(froms) == 1, froms
    m = re.fullmatch(
        r"rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d)(?P<pyminor>\d+)-cu(?P<cuda>\d+)", froms[0]
    )
    assert m, f"base image {froms[0]} is not a pinned Ray GPU image (rayproject/ray:X.Y.Z-pyNN-cuNNN)"
    return m


def test_dockerfile_base_image_matches_pyproject():
    m = dockerfile_from()
    assert m["ray"] == ray_pin()
    requires = pyproject()["project"]["requires-python"]
    minimum = tuple(int(x) for x in re.fullmatch(r">=\s*(\d+)\.(\d+)", requires).groups())
    assert (int(m["py"]), int(m["pyminor"])) >= minimum, (
        f"image Python {m['py']}.{m['pyminor']} vs {requires}"
    )


def test_dockerfile_cuda_matches_torch_wheel():
    """flash-attn compiles with the image's nvcc against torch's CUDA: the major versions must agree."""
    torch = pytest.importorskip("torch")
    if not torch.version.cuda:
        pytest.skip("the installed torch is a CPU build: no CUDA version to compare")
    image_major = int(dockerfile_from()["cuda"][:2])
    assert image_major == int(torch.version.cuda.split(".")[0]), (image_major, torch.version.cuda)


def test_dockerfile_installs_exactly_the_locks_as_non_root():
    text = DOCKERFILE.read_text()
    installs = re.findall(r"pip install ([^\n\\]*)", text)
    locks = [m for line in installs for m in re.findall(r"-r (\S+)", line)]
    assert locks == ["requirements.lock", "requirements-gpu.lock"], installs
    for line in installs:  # every install is pinned and complete: nothing resolved at build time
        assert "--no-deps" in line, line
        assert "--require-hashes" in line or line.rstrip().endswith(" ."), line
    assert "breen.envlock check" in text and "breen.envlock stamp" in text
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must run as a non-root user"
    assert "--no-build-isolation" in text, "flash-attn builds against the installed torch"


def _dockerignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat[1:] if neg else pat
        pat = pat.rstrip("/")
        if fnmatch.fnmatch(path, pat) or fnmatch.fnmatch(path.split("/")[0], pat):
            ignored = not neg
    return ignored


def test_dockerignore_keeps_the_context_small_and_complete():
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [x.strip() for x in lines if x.strip() and not x.strip().startswith("#")]
    for heavy in (".venv", "runs", ".git", "tests", "bench", ".pytest_cache"):
        assert _dockerignored(heavy, patterns), f"{heavy} would be sent to the docker daemon"
    sources = re.findall(r"^COPY\s+(?:--\S+\s+)*(.+)\s+\S+$", DOCKERFILE.read_text(), flags=re.M)
    for src in (s for line in sources for s in line.split()):
        assert not _dockerignored(src, patterns), f"COPY {src}: excluded by .dockerignore"
        assert (REPO / src).exists(), f"COPY {src}: not in the repository"


@pytest.mark.parametrize("overlay", CLUSTER_OVERLAYS)
def test_manifest_versions_match_pyproject(overlay):
    (cluster,) = of_kind(build(overlay), "RayCluster")
    assert cluster["spec"]["rayVersion"] == ray_pin()
    version = pyproject()["project"]["version"]
    for group, pod in _pod_specs(cluster):
        for c in pod["containers"]:
            name, tag, _ = split_image(c["image"])
            assert name.rsplit("/", 1)[-1] == "breen", f"{group}: {c['image']} is not the BREEN image"
            assert tag == version, f"{group}: image tag {tag} != project version {version}"


def test_planner_defaults_are_the_full_overlay():
    from jobs.plan import Assumptions

    (cluster,) = of_kind(build("overlays/full"), "RayCluster")
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    cpu, gpu = groups["cpu"], groups["gpu"]
    a = Assumptions()
    assert a.cpu_cores == cpu["maxReplicas"] * _cpus(cpu["template"]["spec"])
    assert a.gpus == gpu["maxReplicas"] * _gpus(gpu["template"]["spec"])
    assert a.cpus_per_gpu == _cpus(gpu["template"]["spec"]) / _gpus(gpu["template"]["spec"])
    assert a.gpus_stage3 == 32


def test_docs_commands_name_real_overlays_and_steps():
    doc = (REPO / "docs" / "cluster.md").read_text()
    for overlay in re.findall(r"infra/kuberay/(overlays/\w+(?:/jobs)?)\b(?!\.)", doc):
        assert (KUBERAY / overlay / "kustomization.yaml").exists(), overlay
    steps = set(re.findall(r"^run_step ([\w-]+)", doc, flags=re.M))
    assert steps and steps <= set(STEPS), steps
    assert steps == set(STEPS), f"docs skip a step: {set(STEPS) - steps}"
    # the steps are listed in run order
    order = re.findall(r"^run_step ([\w-]+)", doc, flags=re.M)
    assert order == list(STEPS), order
