"""manifests/ renders with kustomize, and every rendered object validates offline.

- Kubernetes kinds: the `kubernetes-validate` schemas, strict (an unknown field fails), for the
  oldest and the newest Kubernetes the manifests claim.
- ScaledObject, TriggerAuthentication: KEDA's CRD openAPIV3Schema from tests/schemas/keda (KEDA v2.20.2),
  made strict the way `kubectl apply` (server-side field validation) treats unknown fields.
- ServiceMonitor, PrometheusRule: no schema here, so checked for their structure and against
  the Services they must find.
- The ScaledObject's trigger metadata parses with the scaler's own parser, and the pieces agree
  (workload = the sidecars' TOKEN_SCALER_WORKLOAD, scalerAddress = the headless Service).
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from gateway.config import parse_routes
from scaler.metadata import KEYS, parse
from token_scaler.errors import MetadataError

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"
KEDA_SCHEMAS = ROOT / "tests" / "schemas" / "keda"
KUBECTL = shutil.which("kubectl")
# The oldest Kubernetes the manifests are written for, and the newest the package knows.
K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())
# Trigger metadata keys KEDA reads itself (and forwards to the scaler with the rest).
KEDA_KEYS = {"scalerAddress", "enableTLS", "unsafeSsl"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "ClusterTriggerAuthentication"}
OUR_IMAGE = "token-scaler"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]

Obj = dict[str, Any]


def _kustomizations() -> dict[str, str]:
    """manifests-relative folder -> Kustomization or Component."""
    found = {}
    for path in sorted(MANIFESTS.rglob("kustomization.yaml")):
        kind = yaml.safe_load(path.read_text()).get("kind", "Kustomization")
        found[path.parent.relative_to(MANIFESTS).as_posix()] = kind
    return found


KUSTOMIZATIONS = _kustomizations()
FOLDERS = [f for f, kind in KUSTOMIZATIONS.items() if kind == "Kustomization"]
COMPONENTS = [f for f, kind in KUSTOMIZATIONS.items() if kind == "Component"]


@functools.cache
def _render(folder: str) -> tuple[Obj, ...]:
    proc = subprocess.run(
        [str(KUBECTL), "kustomize", str(MANIFESTS / folder)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, f"kubectl kustomize manifests/{folder} failed:\n{proc.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


def render(folder: str) -> tuple[Obj, ...]:
    if KUBECTL is None:
        pytest.skip("kubectl is not on PATH: cannot render the kustomize folders")
    return _render(folder)


def every_object() -> Iterator[tuple[str, Obj]]:
    for folder in FOLDERS:
        for obj in render(folder):
            yield folder, obj


def of_kind(objs: tuple[Obj, ...], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: tuple[Obj, ...], kind: str, name: str) -> Obj:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_spec(workload: Obj) -> Obj:
    spec: Obj = workload["spec"]["template"]["spec"]
    return spec


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def pods_selected(objs: tuple[Obj, ...], namespace: str | None, selector: dict[str, str]) -> list[Obj]:
    """Deployments in the namespace whose pod template the label selector matches."""
    return [
        d
        for d in of_kind(objs, "Deployment")
        if d["metadata"].get("namespace") == namespace
        and selects(selector, d["spec"]["template"]["metadata"].get("labels", {}))
    ]


def container_ports(workload: Obj) -> dict[str | int, int]:
    """Port names and numbers of every container -> number."""
    ports: dict[str | int, int] = {}
    for c in pod_spec(workload)["containers"]:
        for p in c.get("ports", []):
            ports[p["containerPort"]] = p["containerPort"]
            if "name" in p:
                ports[p["name"]] = p["containerPort"]
    return ports


def env_of(container: Obj) -> dict[str, Obj]:
    return {e["name"]: e for e in container.get("env", [])}


def test_the_expected_folders_exist() -> None:
    assert {
        "scaler",
        "redis",
        "monitoring",
        "alerts",
        "examples/vllm",
        "examples/mtls",
        "examples/from-zero",
    } <= set(FOLDERS)
    assert {"scaler/mtls", "examples/vllm/mtls"} <= set(COMPONENTS)


def test_every_component_is_rendered_by_some_folder() -> None:
    used = set()
    for folder in FOLDERS:
        spec = yaml.safe_load((MANIFESTS / folder / "kustomization.yaml").read_text())
        for component in spec.get("components", []):
            used.add((MANIFESTS / folder / component).resolve().relative_to(MANIFESTS).as_posix())
    assert set(COMPONENTS) <= used, f"components no folder includes: {set(COMPONENTS) - used}"


@pytest.mark.parametrize("folder", FOLDERS)
def test_renders(folder: str) -> None:
    objs = render(folder)
    assert objs, f"manifests/{folder} renders nothing"
    seen = set()
    for obj in objs:
        meta = obj.get("metadata", {})
        assert obj.get("apiVersion") and obj.get("kind") and meta.get("name"), obj
        ident = (obj["kind"], meta.get("namespace"), meta["name"])
        assert ident not in seen, f"{ident} twice"
        seen.add(ident)
        if obj["kind"] not in CLUSTER_SCOPED:
            assert meta.get("namespace"), f"{obj['kind']}/{meta['name']} in {folder} has no namespace"


def _is_kubernetes(api_version: str) -> bool:
    group = api_version.rpartition("/")[0]
    return "." not in group or group.endswith(".k8s.io")


@pytest.mark.parametrize("folder", FOLDERS)
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_objects_validate(folder: str, version: str) -> None:
    for obj in render(folder):
        if not _is_kubernetes(obj["apiVersion"]):
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{folder}: {obj['kind']}/{obj['metadata']['name']} at {path}: {exc.message}")


def test_the_kubernetes_validation_rejects_an_unknown_field() -> None:
    deployment = copy.deepcopy(one(render("scaler"), "Deployment", "token-scaler"))
    pod_spec(deployment)["containers"][0]["securityContext"]["readOnlyRootFileSystem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


def test_every_kind_has_a_check() -> None:
    checked = {"ScaledObject", "TriggerAuthentication", "ServiceMonitor", "PrometheusRule"}
    unchecked = {
        f"{obj['apiVersion']} {obj['kind']}"
        for _, obj in every_object()
        if not _is_kubernetes(obj["apiVersion"]) and obj["kind"] not in checked
    }
    assert not unchecked, f"kinds no test validates: {unchecked}"


# --- KEDA's CRDs -------------------------------------------------------------------


def _strict(schema: Any) -> Any:
    """Unknown fields fail, as with `kubectl apply` (strict field validation), not pruned."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if (
            schema.get("type") == "object"
            and "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.cache
def _keda_validators() -> dict[str, tuple[set[str], jsonschema.protocols.Validator]]:
    """kind -> (served apiVersions, validator of the stored version's schema)."""
    validators: dict[str, tuple[set[str], jsonschema.protocols.Validator]] = {}
    for path in sorted(KEDA_SCHEMAS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        served = {f"{group}/{v['name']}" for v in crd["spec"]["versions"] if v.get("served")}
        stored = next(v for v in crd["spec"]["versions"] if v.get("storage"))
        schema = _strict(stored["schema"]["openAPIV3Schema"])
        validators[kind] = (served, jsonschema.Draft4Validator(schema))
    return validators


def keda_validators() -> dict[str, tuple[set[str], jsonschema.protocols.Validator]]:
    validators = _keda_validators()
    assert {"ScaledObject", "TriggerAuthentication"} <= validators.keys(), (
        f"KEDA's CRD schemas are missing from {KEDA_SCHEMAS}: found {sorted(validators)}"
    )
    return validators


@pytest.mark.parametrize("folder", FOLDERS)
def test_keda_objects_validate_against_the_crds(folder: str) -> None:
    validators = keda_validators()
    for obj in render(folder):
        if not obj["apiVersion"].startswith("keda.sh/"):
            continue
        assert obj["kind"] in validators, f"no CRD schema for {obj['kind']}"
        served, validator = validators[obj["kind"]]
        assert obj["apiVersion"] in served, f"{obj['kind']}: {obj['apiVersion']} is not served ({served})"
        errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.path))
        assert not errors, "\n".join(
            f"{folder}: {obj['kind']}/{obj['metadata']['name']} at "
            f"{'.'.join(str(p) for p in e.path)}: {e.message}"
            for e in errors
        )


def test_the_crd_validation_rejects_a_misspelt_field() -> None:
    _, validator = keda_validators()["ScaledObject"]
    scaled = copy.deepcopy(one(render("examples/vllm"), "ScaledObject", "vllm"))
    assert not list(validator.iter_errors(scaled))
    hpa = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]
    hpa["behaviour"] = hpa.pop("behavior")
    assert list(validator.iter_errors(scaled))


# --- ScaledObject: the scaler's metadata and the pieces it names ----------------------


def scaled_objects() -> Iterator[tuple[str, Obj]]:
    for folder, obj in every_object():
        if obj["kind"] == "ScaledObject":
            yield folder, obj


def test_there_are_scaled_objects() -> None:
    assert {folder for folder, _ in scaled_objects()} == {
        "examples/vllm",
        "examples/mtls",
        "examples/from-zero",
    }


def test_scaled_object_metadata_parses_with_the_scalers_parser() -> None:
    scaler_objs = render("scaler")
    for folder, so in scaled_objects():
        ns, name = so["metadata"]["namespace"], so["metadata"]["name"]
        triggers = [t for t in so["spec"]["triggers"] if t["type"] in ("external", "external-push")]
        assert [t["type"] for t in triggers] == ["external-push"], folder
        metadata = triggers[0]["metadata"]
        unknown = set(metadata) - set(KEYS) - KEDA_KEYS
        assert not unknown, f"{folder}: keys neither the scaler nor KEDA reads (typos?): {unknown}"
        settings = parse(metadata, ns, name)

        # Sensible numbers, not only valid ones.
        assert 100 <= settings.tokens_per_second_per_replica <= 1_000_000
        assert 1.0 <= settings.headroom <= 2.0
        assert 0 < settings.target < settings.tokens_per_second_per_replica
        assert settings.window_s >= 2 * so["spec"].get("pollingInterval", 30)
        assert settings.panic_window_s < settings.window_s
        assert settings.generation_weight > 0
        if settings.max_replicas:  # the saturation signal's ceiling is the ScaledObject's own
            assert settings.max_replicas == so["spec"]["maxReplicaCount"], folder

        # workload: what the sidecars of the target Deployment report as.
        target = one(render(folder), "Deployment", so["spec"]["scaleTargetRef"]["name"])
        assert target["metadata"]["namespace"] == ns
        assert "replicas" not in target["spec"], "the HPA owns replicas: `kubectl apply` would reset them"
        sidecars = [c for c in pod_spec(target)["containers"] if c["image"].startswith(OUR_IMAGE + ":")]
        assert len(sidecars) == 1 and sidecars[0]["args"] == ["sidecar"]
        assert env_of(sidecars[0])["TOKEN_SCALER_WORKLOAD"]["value"] == settings.workload

        # scalerAddress: the headless Service of manifests/scaler, on the gRPC port.
        host, _, port = metadata["scalerAddress"].rpartition(":")
        match = re.fullmatch(r"([a-z0-9-]+)\.([a-z0-9-]+)\.svc(\.cluster\.local)?", host)
        assert match, f"scalerAddress {metadata['scalerAddress']!r} is not <service>.<namespace>.svc..."
        service = one(scaler_objs, "Service", match[1])
        assert service["metadata"]["namespace"] == match[2]
        assert service["spec"]["clusterIP"] == "None", "KEDA's round robin needs the headless Service"
        assert int(port) in [p["port"] for p in service["spec"]["ports"]]
        backends = pods_selected(scaler_objs, match[2], service["spec"]["selector"])
        assert [d["metadata"]["name"] for d in backends] == ["token-scaler"]
        assert container_ports(backends[0])["grpc"] == int(port)


def test_scaled_object_scaling_policy() -> None:
    for folder, so in scaled_objects():
        spec = so["spec"]
        # Zero replicas only behind a gateway: without one, nothing holds a request or wakes the workload.
        floor = 0 if gateways(render(folder)) else 1
        assert floor <= spec["minReplicaCount"] <= spec["maxReplicaCount"], folder
        fallback = spec["fallback"]
        assert fallback["failureThreshold"] >= 1
        assert spec["minReplicaCount"] <= fallback["replicas"] <= spec["maxReplicaCount"]
        # KEDA allows fallback only with AverageValue (the default) on external triggers.
        assert all(t.get("metricType", "AverageValue") == "AverageValue" for t in spec["triggers"])
        behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        assert 60 <= behavior["scaleDown"]["stabilizationWindowSeconds"] <= 120
        assert behavior["scaleUp"]["stabilizationWindowSeconds"] <= 30


def test_a_bad_value_in_the_example_metadata_would_be_refused() -> None:
    so = one(render("examples/vllm"), "ScaledObject", "vllm")
    metadata = dict(so["spec"]["triggers"][0]["metadata"])
    metadata["windowSeconds"] = "5"
    with pytest.raises(MetadataError):
        parse(metadata, so["metadata"]["namespace"], so["metadata"]["name"])


def test_mtls_wiring() -> None:
    objs = render("examples/mtls")
    scaler = one(objs, "Deployment", "token-scaler")
    (container,) = pod_spec(scaler)["containers"]
    env = env_of(container)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod_spec(scaler)["volumes"] if "secret" in v}
    assert secrets.get("tls") == "token-scaler-tls"
    for var in ("TOKEN_SCALER_TLS_CERT", "TOKEN_SCALER_TLS_KEY", "TOKEN_SCALER_CLIENT_CA"):
        assert env[var]["value"].startswith(mounts["tls"] + "/"), var
    # The kubelet's gRPC probe cannot speak TLS: readiness moves to /readyz.
    assert "grpc" not in container["readinessProbe"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # The secret's files are readable by the non-root user.
    assert pod_spec(scaler)["securityContext"]["fsGroup"] == 65532

    so = one(objs, "ScaledObject", "vllm")
    auth_name = so["spec"]["triggers"][0]["authenticationRef"]["name"]
    auth = one(objs, "TriggerAuthentication", auth_name)
    assert auth["metadata"]["namespace"] == so["metadata"]["namespace"]
    refs = {r["parameter"]: r for r in auth["spec"]["secretTargetRef"]}
    assert set(refs) == {"caCert", "tlsClientCert", "tlsClientKey"}
    assert len({r["name"] for r in refs.values()}) == 1


def test_plain_folders_have_no_tls() -> None:
    (container,) = pod_spec(one(render("scaler"), "Deployment", "token-scaler"))["containers"]
    assert "TOKEN_SCALER_TLS_CERT" not in env_of(container)
    assert container["readinessProbe"]["grpc"]["port"] == 9090
    so = one(render("examples/vllm"), "ScaledObject", "vllm")
    assert "authenticationRef" not in so["spec"]["triggers"][0]


# --- the scaler's Deployment and its neighbours ----------------------------------------


def test_scaler_deployment() -> None:
    objs = render("scaler")
    scaler = one(objs, "Deployment", "token-scaler")
    assert scaler["spec"]["replicas"] == 2
    (container,) = pod_spec(scaler)["containers"]
    assert container["args"] == ["serve"]
    assert container_ports(scaler)["grpc"] == 9090 and container_ports(scaler)["http"] == 9091
    assert "secretKeyRef" in env_of(container)["REDIS_URL"]["valueFrom"]
    # Liveness must not follow Redis: /healthz, not the gRPC health status.
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    labels = scaler["spec"]["template"]["metadata"]["labels"]

    (pdb,) = of_kind(objs, "PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"]["matchLabels"], labels)
    assert 1 <= pdb["spec"]["minAvailable"] < scaler["spec"]["replicas"]

    (policy,) = [p for p in of_kind(objs, "NetworkPolicy") if p["metadata"]["name"] == "token-scaler"]
    assert selects(policy["spec"]["podSelector"]["matchLabels"], labels)
    admitted = [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]]
    assert "grpc" in admitted


@pytest.mark.parametrize("folder", FOLDERS)
def test_our_containers_are_hardened(folder: str) -> None:
    for obj in render(folder):
        if obj["kind"] != "Deployment":
            continue
        spec = pod_spec(obj)
        pod_sc = spec.get("securityContext", {})
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", obj["metadata"]["name"]
        ours = folder in ("scaler", "redis", "examples/mtls") and obj["metadata"]["name"] != "vllm"
        for c in spec["containers"]:
            where = f"{folder}: {obj['metadata']['name']}/{c['name']}"
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            assert c.get("resources", {}).get("requests"), f"{where}: no resource requests"
            assert c.get("resources", {}).get("limits", {}).get("memory"), f"{where}: no memory limit"
            assert c.get("readinessProbe") and c.get("livenessProbe"), f"{where}: probes"
            if not (ours or c["image"].startswith(OUR_IMAGE + ":")):
                continue
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, where
            if c["image"].startswith(OUR_IMAGE + ":"):
                assert c["image"] == f"{OUR_IMAGE}:{VERSION}", f"{where}: tag is not the project version"
                assert sc.get("runAsUser", pod_sc.get("runAsUser")) == 65532, where
                assert c["args"][0] in ("serve", "sidecar", "gateway"), where
                tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
                volumes = {v["name"]: v for v in spec.get("volumes", [])}
                assert tmp and "emptyDir" in volumes[tmp[0]["name"]], f"{where}: /tmp must be an emptyDir"


def gateways(objs: tuple[Obj, ...]) -> list[Obj]:
    """Deployments running ``token-scaler gateway``."""
    return [
        d
        for d in of_kind(objs, "Deployment")
        if any(
            c["image"].startswith(OUR_IMAGE + ":") and c["args"][:1] == ["gateway"]
            for c in pod_spec(d)["containers"]
        )
    ]


def test_from_zero_wiring() -> None:
    objs = render("examples/from-zero")
    so = one(objs, "ScaledObject", "vllm")
    assert so["spec"]["minReplicaCount"] == 0
    metadata = so["spec"]["triggers"][0]["metadata"]
    settings = parse(metadata, so["metadata"]["namespace"], so["metadata"]["name"])
    # A held request's tokens are all the demand there is at zero: any of it activates.
    assert settings.activation_tokens_per_second == 0
    [gateway] = gateways(objs)
    container = next(c for c in pod_spec(gateway)["containers"] if c["args"] == ["gateway"])
    env = env_of(container)
    # The gateway names the workload and the model its vLLM serves.
    [route] = parse_routes(env["TOKEN_SCALER_WORKLOAD"]["value"])
    assert route.workload == settings.workload
    model = one(objs, "Deployment", "vllm")
    vllm = next(c for c in pod_spec(model)["containers"] if c["name"] == "vllm")
    assert route.models == tuple(
        a.split("=", 1)[1] for a in vllm["args"] if a.startswith("--served-model-name=")
    )
    # Held requests outlast the model's cold start; the drain fits in the grace period.
    probe = vllm["startupProbe"]
    assert float(env["TOKEN_SCALER_QUEUE_TIMEOUT"]["value"]) >= 300
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 300
    delay, drain = (float(env[f"TOKEN_SCALER_{k}"]["value"]) for k in ("SHUTDOWN_DELAY", "DRAIN_TIMEOUT"))
    assert delay + drain < pod_spec(gateway)["terminationGracePeriodSeconds"]
    # The sidecars announce themselves at their pod IP, with the server's concurrency.
    sidecar = next(c for c in pod_spec(model)["containers"] if c["name"] == "token-scaler")
    sidecar_env = env_of(sidecar)
    assert sidecar_env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["REDIS_URL"] == sidecar_env["REDIS_URL"], "the gateway and the sidecars share one Redis"
    vllm_args = next(c for c in pod_spec(model)["containers"] if c["name"] == "vllm")["args"]
    assert f"--max-num-seqs={sidecar_env['TOKEN_SCALER_CAPACITY_REQUESTS']['value']}" in vllm_args
    # Clients call the gateway's Service; the gateway is scaled on its CPU (requests set).
    service = one(objs, "Service", "vllm-gateway")
    assert pods_selected(objs, service["metadata"]["namespace"], service["spec"]["selector"]) == [gateway]
    hpa = one(objs, "HorizontalPodAutoscaler", "vllm-gateway")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "vllm-gateway" and hpa["spec"]["minReplicas"] >= 2
    assert container["resources"]["requests"]["cpu"]
    # Its pods may reach Redis.
    (redis_policy,) = of_kind(render("redis"), "NetworkPolicy")
    labels = gateway["spec"]["template"]["metadata"]["labels"]
    peers = [peer for rule in redis_policy["spec"]["ingress"] for peer in rule["from"]]
    assert any(selects(p.get("podSelector", {}).get("matchLabels", {}), labels) for p in peers)


def test_sidecar_pod_shutdown_order() -> None:
    deployment = one(render("examples/vllm"), "Deployment", "vllm")
    spec = pod_spec(deployment)
    containers = {c["name"]: c for c in spec["containers"]}
    sidecar, model = containers["token-scaler"], containers["vllm"]
    env = env_of(sidecar)
    delay, drain = (float(env[f"TOKEN_SCALER_{k}"]["value"]) for k in ("SHUTDOWN_DELAY", "DRAIN_TIMEOUT"))
    model_sleep = int(model["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert delay + drain < model_sleep < spec["terminationGracePeriodSeconds"]
    assert env["TOKEN_SCALER_UPSTREAM"]["value"] == f"http://127.0.0.1:{container_ports(deployment)['model']}"
    # The pod may reach the Redis of manifests/redis.
    (redis_policy,) = of_kind(render("redis"), "NetworkPolicy")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    peers = [peer for rule in redis_policy["spec"]["ingress"] for peer in rule["from"]]
    assert any(selects(p.get("podSelector", {}).get("matchLabels", {}), labels) for p in peers)


@pytest.mark.parametrize("folder", FOLDERS)
def test_services_and_policies_find_their_pods(folder: str) -> None:
    objs = render(folder)
    for svc in of_kind(objs, "Service"):
        ns, name = svc["metadata"]["namespace"], svc["metadata"]["name"]
        backends = pods_selected(objs, ns, svc["spec"].get("selector", {}))
        assert backends, f"{folder}: Service {name} selects no pods"
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert all(target in container_ports(d) for d in backends), f"{folder}: {name} port {target}"
    for policy in of_kind(objs, "NetworkPolicy"):
        ns = policy["metadata"]["namespace"]
        selected = pods_selected(objs, ns, policy["spec"]["podSelector"]["matchLabels"])
        assert selected, f"{folder}: NetworkPolicy {policy['metadata']['name']} selects no pods"
        for rule in policy["spec"].get("ingress", []):
            for port in rule.get("ports", []):
                assert all(port["port"] in container_ports(d) for d in selected), port


def test_vllm_service_targets_the_sidecar() -> None:
    objs = render("examples/vllm")
    deployment = one(objs, "Deployment", "vllm")
    sidecar = next(c for c in pod_spec(deployment)["containers"] if c["name"] == "token-scaler")
    sidecar_ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    service = one(objs, "Service", "vllm")
    http = next(p for p in service["spec"]["ports"] if p["name"] == "http")
    assert sidecar_ports[http["targetPort"]] == 8080
    # Nothing reaches vLLM's own port from outside the pod.
    (policy,) = of_kind(objs, "NetworkPolicy")
    admitted = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert admitted == {"proxy", "admin"}
    # Each port from a named peer only: the gateway's pods, Prometheus' namespace.
    peers = {port["port"]: rule["from"] for rule in policy["spec"]["ingress"] for port in rule["ports"]}
    assert peers["proxy"] == [
        {"namespaceSelector": {}, "podSelector": {"matchLabels": {"token-scaler.io/gateway": "true"}}}
    ]
    assert peers["admin"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]


# --- Prometheus Operator kinds and the dashboard -------------------------------------------

DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")


def test_service_monitors_find_their_services() -> None:
    services = [o for f in ("scaler", "examples/vllm") for o in of_kind(render(f), "Service")]
    monitors = of_kind(render("monitoring"), "ServiceMonitor")
    assert {m["metadata"]["name"] for m in monitors} == {"token-scaler", "token-scaler-sidecars"}
    for monitor in monitors:
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        spec = monitor["spec"]
        selector = spec["selector"]["matchLabels"]
        namespaces = spec["namespaceSelector"]
        matched = [
            s
            for s in services
            if selects(selector, s["metadata"].get("labels", {}))
            and (namespaces.get("any") is True or s["metadata"]["namespace"] in namespaces["matchNames"])
        ]
        assert len(matched) == 1, f"{monitor['metadata']['name']} matches {len(matched)} Services"
        assert spec["endpoints"]
        for endpoint in spec["endpoints"]:
            assert endpoint["port"] in [p["name"] for p in matched[0]["spec"]["ports"]]
            assert endpoint.get("path", "/metrics") == "/metrics"
            assert DURATION.match(endpoint["interval"])
    # The scaler's gauges carry the ScaledObject's namespace: it must survive the scrape.
    scaler_monitor = next(m for m in monitors if m["metadata"]["name"] == "token-scaler")
    assert scaler_monitor["spec"]["endpoints"][0]["honorLabels"] is True


def test_prometheus_rules_are_well_formed() -> None:
    (rule_obj,) = of_kind(render("alerts"), "PrometheusRule")
    assert rule_obj["apiVersion"] == "monitoring.coreos.com/v1"
    groups = rule_obj["spec"]["groups"]
    assert groups and len({g["name"] for g in groups}) == len(groups)
    for group in groups:
        assert group["rules"]
        for rule in group["rules"]:
            assert ("alert" in rule) != ("record" in rule), rule
            assert isinstance(rule["expr"], str) and rule["expr"].strip()
            assert "for" not in rule or DURATION.match(rule["for"])
            for field in ("labels", "annotations"):
                assert all(isinstance(v, str) for v in rule.get(field, {}).values())
            _assert_metrics_exist(rule["expr"])


DASHBOARD = MANIFESTS / "monitoring" / "token-scaler-dashboard.json"


# Metrics the alerts use before their exporter lands: the sidecar's budget policy (issue 4).
PROMISED_METRICS = {"tokenscaler_budget_used_ratio"}


def _declared_metrics() -> set[str]:
    names = set(PROMISED_METRICS)
    for module in (
        "scaler/metrics.py",
        "scaler/cost.py",
        *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "sidecar").rglob("*.py")),
    ):
        names |= set(re.findall(r'"(tokenscaler_[a-z0-9_]+)"', (ROOT / module).read_text()))
    return names


def _assert_metrics_exist(expr: str) -> None:
    declared = _declared_metrics()
    for name in re.findall(r"\btokenscaler_[a-z0-9_]+", expr):
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert base in declared or base.removesuffix("_total") in declared, f"{name} is exported by no module"


def test_dashboard() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    for expr in exprs:
        _assert_metrics_exist(expr)
    text = "\n".join(exprs)
    for needed in (
        "tokenscaler_tokens_total",
        "tokenscaler_requests_total",
        "tokenscaler_scaler_desired_replicas",
        "tokenscaler_scaler_metric_value",
        "kube_deployment_status_replicas",
    ):
        assert needed in text, f"the dashboard does not show {needed}"
    # Every $variable used is defined.
    defined = {v["name"] for v in dashboard["templating"]["list"]}
    used = set(re.findall(r"\$\{?([a-z_]+)", json.dumps(panels)))
    assert used <= defined, used - defined
    configmap = one(render("monitoring"), "ConfigMap", "token-scaler-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"][DASHBOARD.name]) == dashboard
