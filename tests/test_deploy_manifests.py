"""Every deployment file parses and carries what its consumer requires.

- KubeRay ``RayCluster`` / ``RayJob`` (deploy/kuberay/): checked against a JSON schema written
  from KubeRay's ``ray.io/v1`` Go types (``raycluster_types.go``, ``rayjob_types.go``: the
  fields without ``omitempty`` are required; ``rayStartParams`` is a map of strings). No PyPI
  package ships KubeRay's CRD OpenAPI schema (searched: kuberay, rayman, kubernetes-validate —
  the latter knows only built-in kinds), so the schema below is ours; the pod templates are
  checked for the fields Kubernetes itself requires.
- The ``ray up`` config (deploy/launcher/): Ray's own ``ray/autoscaler/ray-schema.json`` with
  jsonschema, then Ray's ``prepare_config`` + ``validate_config`` (what ``ray up`` runs).
- The run config each manifest names passes ``opdplus config``, and the custom resources its
  roles ask for fit the node groups the manifest starts.
- One run directory (services/storage.py): every pod template (head and each worker group)
  mounts the shared ``runs`` volume at the same path, and each RayJob sets ``run.out_dir`` to
  it; the launcher mounts one filesystem at the path its instructions set ``run.out_dir`` to.
- Dockerfiles and the root .dockerignore keep the build context small.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
KUBERAY = sorted((REPO / "deploy" / "kuberay").glob("*.yaml"))
LAUNCHER = REPO / "deploy" / "launcher" / "cluster.yaml"

_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_CONTAINER = {
    "type": "object",
    "required": ["name", "image"],
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "image": {"type": "string", "minLength": 1},
        "env": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": {"type": "string"}, "value": {"type": "string"}},
            },
        },
        "resources": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"requests": {"type": "object"}, "limits": {"type": "object"}},
        },
    },
}
_POD_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {"containers": {"type": "array", "minItems": 1, "items": _CONTAINER}},
        }
    },
}
_CLUSTER_SPEC = {
    "type": "object",
    "required": ["headGroupSpec"],
    "properties": {
        "rayVersion": {"type": "string"},
        "headGroupSpec": {
            "type": "object",
            "required": ["rayStartParams", "template"],
            "properties": {"rayStartParams": _STR_MAP, "template": _POD_TEMPLATE},
        },
        "workerGroupSpecs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": [
                    "groupName",
                    "minReplicas",
                    "maxReplicas",
                    "rayStartParams",
                    "template",
                ],
                "properties": {
                    "groupName": {"type": "string", "minLength": 1},
                    "replicas": {"type": "integer", "minimum": 0},
                    "minReplicas": {"type": "integer", "minimum": 0},
                    "maxReplicas": {"type": "integer", "minimum": 0},
                    "rayStartParams": _STR_MAP,
                    "template": _POD_TEMPLATE,
                },
            },
        },
    },
}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}},
}
SCHEMAS = {
    "RayCluster": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "ray.io/v1"},
            "metadata": _METADATA,
            "spec": _CLUSTER_SPEC,
        },
    },
    "RayJob": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "ray.io/v1"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["entrypoint", "rayClusterSpec"],
                "properties": {
                    "entrypoint": {"type": "string", "minLength": 1},
                    "runtimeEnvYAML": {"type": "string"},
                    "shutdownAfterJobFinishes": {"type": "boolean"},
                    "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                    "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                    "rayClusterSpec": _CLUSTER_SPEC,
                },
            },
        },
    },
}


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def _group_resources(params: dict) -> dict[str, float]:
    """Ray resources a node group offers, from its rayStartParams (KubeRay's quoting:
    ``resources: '"{\\"rollout\\": 2}"'``)."""
    out = {"CPU": float(params.get("num-cpus", 0)), "GPU": float(params.get("num-gpus", 0))}
    raw = params.get("resources")
    if raw:
        out |= json.loads(json.loads(raw))
    return out


def _run_config(entrypoint: str) -> tuple[str, list[str]]:
    argv = shlex.split(entrypoint)
    assert argv[:2] == ["opdplus", "train"], entrypoint
    config = argv[argv.index("--config") + 1]
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    return config, sets


def test_there_are_cpu_and_gpu_cluster_and_job_manifests():
    names = {p.name for p in KUBERAY}
    assert {"raycluster-cpu.yaml", "raycluster-gpu.yaml", "rayjob-cpu.yaml", "rayjob-gpu.yaml"} <= (
        names
    )


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifest_matches_schema(path):
    import ray

    docs = _docs(path)
    assert docs, f"{path} is empty"
    for doc in docs:
        assert doc.get("kind") in SCHEMAS, f"{path}: unexpected kind {doc.get('kind')!r}"
        jsonschema.validate(doc, SCHEMAS[doc["kind"]])
        spec = _cluster_spec(doc)
        assert spec["rayVersion"] == ray.__version__, "image and manifest must run the same Ray"
        groups = spec.get("workerGroupSpecs", [])
        assert len({g["groupName"] for g in groups}) == len(groups), "duplicate groupName"
        for g in groups:
            assert g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]
            _group_resources(g["rayStartParams"])  # the resources string must parse
        for tmpl in [spec["headGroupSpec"]["template"]] + [g["template"] for g in groups]:
            env = {e["name"]: e for e in tmpl["spec"]["containers"][0].get("env", [])}
            # Token auth stays on in every pod, with the token from a Secret, not inline.
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]


def test_kuberay_schema_rejects_a_broken_manifest():
    """The schema has teeth: a missing template or a non-string start param fails."""
    doc = _docs(REPO / "deploy/kuberay/raycluster-cpu.yaml")[0]
    bad = copy.deepcopy(doc)
    del bad["spec"]["workerGroupSpecs"][0]["template"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, SCHEMAS["RayCluster"])
    bad = copy.deepcopy(doc)
    bad["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, SCHEMAS["RayCluster"])


@pytest.mark.parametrize(
    "path", [p for p in KUBERAY if p.name.startswith("rayjob")], ids=lambda p: p.name
)
def test_rayjob_run_config_validates_and_fits_the_cluster(path):
    from services.config import load_config

    doc = _docs(path)[0]
    config, sets = _run_config(doc["spec"]["entrypoint"])
    out = subprocess.run(
        [sys.executable, "-m", "services.cli", "config", "--config", config]
        + [x for s in sets for x in ("--set", s)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    cfg = load_config(REPO / config, sets)
    yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    # Every role's actors fit on the node groups that offer its custom resources.
    groups = [
        (g["maxReplicas"], _group_resources(g["rayStartParams"]))
        for g in doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    ]
    r, lr = cfg.rollout, cfg.learner
    roles = [
        (r.num_samplers, {"CPU": r.sampler_cpus, "GPU": r.sampler_gpus} | r.sampler_resources),
        (r.num_scorers, {"CPU": r.scorer_cpus, "GPU": r.scorer_gpus} | r.scorer_resources),
        (lr.num_ranks, {"CPU": lr.cpus_per_rank, "GPU": lr.gpus_per_rank} | lr.resources),
    ]
    assert r.sampler_resources and lr.resources, "roles must be pinned to their node groups"
    need: dict[str, float] = {}
    for count, demand in roles:
        assert any(all(offer.get(k, 0) >= v for k, v in demand.items()) for _, offer in groups), (
            f"{path.name}: no node group can host {demand}"
        )
        for k, v in demand.items():
            need[k] = need.get(k, 0) + count * v
    have: dict[str, float] = {}
    for replicas, offer in groups:
        for k, v in offer.items():
            have[k] = have.get(k, 0) + replicas * v
    for k, v in need.items():
        assert have.get(k, 0) >= v, f"{path.name}: the run needs {v} {k}, the cluster has {have}"


RUNS_VOLUME, RUNS_PATH = "runs", "/runs"
LAUNCHER_RUNS = "/mnt/opdplus-runs"


def runs_volume_problems(doc: dict) -> list[str]:
    """What keeps the pods of ``doc`` from sharing one run directory: a pod template whose
    containers do not all mount the ``runs`` volume at RUNS_PATH, a ``runs`` volume that is
    not shared storage (a PVC, NFS or hostPath; an emptyDir dies with its pod), or a RayJob
    whose entrypoint does not set run.out_dir to it."""
    spec = _cluster_spec(doc)
    problems = []
    groups = [("head", spec["headGroupSpec"])] + [
        (g["groupName"], g) for g in spec.get("workerGroupSpecs", [])
    ]
    for name, group in groups:
        pod = group["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        runs = volumes.get(RUNS_VOLUME)
        if runs is None or not ({"persistentVolumeClaim", "nfs", "hostPath"} & set(runs)):
            problems.append(f"{name}: no shared '{RUNS_VOLUME}' volume (PVC, NFS or hostPath)")
        for c in pod["containers"]:
            mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
            if mounts.get(RUNS_VOLUME) != RUNS_PATH:
                problems.append(
                    f"{name}/{c['name']}: does not mount '{RUNS_VOLUME}' at {RUNS_PATH}"
                )
    if doc["kind"] == "RayJob":
        _, sets = _run_config(doc["spec"]["entrypoint"])
        if f"run.out_dir={RUNS_PATH}" not in sets:
            problems.append(f"entrypoint does not set run.out_dir={RUNS_PATH}")
    return problems


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_every_pod_mounts_the_runs_volume(path):
    for doc in _docs(path):
        assert runs_volume_problems(doc) == [], path.name
    header = path.read_text().split("apiVersion:")[0]
    assert "opdplus-runs" in header and RUNS_PATH in header, "the header says how runs are kept"


def test_a_pod_without_the_runs_volume_is_caught():
    """The check has teeth: the learner pod without the mount, a runs volume that dies with the
    pod, and a RayJob that leaves run.out_dir relative each fail it."""
    doc = _docs(REPO / "deploy/kuberay/rayjob-cpu.yaml")[0]
    bad = copy.deepcopy(doc)
    learner = next(
        g for g in bad["spec"]["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == "learner"
    )
    container = learner["template"]["spec"]["containers"][0]
    container["volumeMounts"] = [m for m in container["volumeMounts"] if m["name"] != "runs"]
    assert runs_volume_problems(bad) == ["learner/ray-learner: does not mount 'runs' at /runs"]
    bad = copy.deepcopy(doc)
    head = bad["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    head["volumes"] = [
        {"name": "runs", "emptyDir": {}} if v["name"] == "runs" else v for v in head["volumes"]
    ]
    assert runs_volume_problems(bad) == ["head: no shared 'runs' volume (PVC, NFS or hostPath)"]
    bad = copy.deepcopy(doc)
    bad["spec"]["entrypoint"] = bad["spec"]["entrypoint"].replace(" --set run.out_dir=/runs", "")
    assert runs_volume_problems(bad) == ["entrypoint does not set run.out_dir=/runs"]


def test_launcher_mounts_one_runs_filesystem_on_every_node():
    cfg = yaml.safe_load(LAUNCHER.read_text())
    # setup_commands run on the head and on every worker.
    assert any("mount" in c and LAUNCHER_RUNS in c for c in cfg["setup_commands"])
    assert f"run.out_dir={LAUNCHER_RUNS}" in LAUNCHER.read_text().split("cluster_name:")[0]


def test_raycluster_and_rayjob_describe_the_same_cluster():
    for kind in ("cpu", "gpu"):
        rc = _docs(REPO / f"deploy/kuberay/raycluster-{kind}.yaml")[0]
        rj = _docs(REPO / f"deploy/kuberay/rayjob-{kind}.yaml")[0]
        assert rc["spec"] == rj["spec"]["rayClusterSpec"], kind


def _schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_launcher_config_passes_rays_schema_and_ray_up_preparation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load(LAUNCHER.read_text())
    jsonschema.validate(cfg, _schema())
    full = prepare_config(copy.deepcopy(cfg))  # what `ray up` does before launching anything
    validate_config(full)
    assert full["head_node_type"] in full["available_node_types"]
    start = " ".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in start and "--dashboard-host=127.0.0.1" in start
    for pattern in ("**/.venv", "**/.cache", "**/runs"):
        assert pattern in cfg["rsync_exclude"]
    # The roles' custom resources in gpu_cluster.toml are offered by the nodes started here.
    from services.config import load_config

    gpu = load_config(REPO / "deploy/configs/gpu_cluster.toml")
    for res in (*gpu.rollout.sampler_resources, *gpu.learner.resources):
        assert f'"{res}"' in start, res
    bad = copy.deepcopy(cfg)
    bad["provider"] = "local"  # must be a table
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, _schema())


def _ignored(rel: str, patterns: list[str]) -> bool:
    import fnmatch

    parts = rel.split("/")
    for pat in patterns:
        p = pat.rstrip("/")
        if p.startswith("**/"):
            if any(fnmatch.fnmatch(x, p[3:]) for x in parts):
                return True
        elif any(fnmatch.fnmatch("/".join(parts[: i + 1]), p) for i in range(len(parts))):
            return True
    return False


def test_dockerignore_keeps_the_build_context_small():
    patterns = [
        ln.strip()
        for ln in (REPO / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    for must in (".venv", ".cache", "runs", "bench/results", ".git"):
        assert must in patterns, must
    total = 0
    for path in REPO.rglob("*"):
        rel = path.relative_to(REPO).as_posix()
        if path.is_file() and not _ignored(rel, patterns):
            total += path.stat().st_size
    assert total < 50 * 2**20, f"build context would be {total / 2**20:.0f} MiB"


@pytest.mark.parametrize("kind", ["cpu", "gpu"])
def test_dockerfiles(kind):
    text = (REPO / f"deploy/docker/Dockerfile.{kind}").read_text()
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0].startswith("FROM "), "a Dockerfile starts with FROM"
    assert "COPY . ." in lines
    # KubeRay replaces the container command with its own `ray start`: no ENTRYPOINT.
    assert not any(ln.startswith("ENTRYPOINT") for ln in lines)
    assert re.search(r"OPDPLUS_CACHE=\S+", text)
    extra = "cpu" if kind == "cpu" else "gpu"
    assert (f".[{extra}" in text) or ("setup_env.sh" in text and kind == "cpu")
    assert not (REPO / "deploy" / "Dockerfile").exists(), "moved to deploy/docker/"
