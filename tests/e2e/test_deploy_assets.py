"""The dashboard and alert rules only reference metrics the server really exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.server_process import start_server

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"

pytestmark = pytest.mark.e2e


def _referenced_metrics() -> set[str]:
    text = (DEPLOY / "grafana" / "editserve-dashboard.json").read_text()
    text += (DEPLOY / "prometheus" / "alerts.yaml").read_text()
    names = set(re.findall(r"editserve_[a-z0-9_]+", text))
    return {n for n in names if n != "editserve_dashboard"}


def test_deploy_files_parse():
    json.loads((DEPLOY / "grafana" / "editserve-dashboard.json").read_text())
    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / "editserve.yaml").read_text()))
    assert {d["kind"] for d in docs} == {"PersistentVolumeClaim", "Deployment", "Service"}
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())
    assert rules["groups"][0]["rules"]


def test_deployment_reads_the_editor_token_from_a_secret_mount():
    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / "editserve.yaml").read_text()))
    pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    [container] = pod["containers"]
    args = container["args"]
    token_file = args[args.index("--editor-token-file") + 1]
    mount = next(m for m in container["volumeMounts"] if token_file.startswith(m["mountPath"] + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert mount["readOnly"] and volume["secret"]["secretName"] == "editserve-editor-token"
    assert token_file.endswith("/" + volume["secret"]["items"][0]["path"])


PROMTOOL = shutil.which("promtool")


@pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian package prometheus) not installed")
def test_promtool_accepts_alert_rules():
    done = subprocess.run([PROMTOOL, "check", "rules", str(DEPLOY / "prometheus" / "alerts.yaml")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian package prometheus) not installed")
def test_alerts_fire_on_measured_drift_and_slow_swaps_only():
    """Prometheus' rule engine evaluates the alerts on series shaped like our measurements."""
    done = subprocess.run([PROMTOOL, "test", "rules", str(ROOT / "tests" / "data" / "alerts_test.yaml")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


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
    missing = _referenced_metrics() - exported
    assert not missing, f"dashboard/alerts reference metrics the server does not export: {sorted(missing)}"
