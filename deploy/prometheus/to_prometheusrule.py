"""Write deploy/k8s/base/prometheusrule.yaml from deploy/prometheus/alerts.yaml.

alerts.yaml is the one source of truth for editserve's rules (Prometheus loads it as is, promtool
tests it); the Prometheus Operator wants the same groups inside a PrometheusRule object. Run
this after editing alerts.yaml: `python deploy/prometheus/to_prometheusrule.py`
(tests/e2e/test_deploy_assets.py fails while the two disagree). Needs PyYAML.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "alerts.yaml"
TARGET = HERE.parent / "k8s" / "base" / "prometheusrule.yaml"

HEADER = """\
# GENERATED from deploy/prometheus/alerts.yaml by deploy/prometheus/to_prometheusrule.py: edit
# alerts.yaml (the one source of truth, with promtool tests) and run the script; do not edit here.
# Prometheus Operator: add the label your Prometheus' ruleSelector wants (kube-prometheus-stack:
# `release: <its Helm release>`) if it selects rules by label.
"""


class _Dumper(yaml.SafeDumper):
    pass


def _string(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None  # multi-line expressions stay readable
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _string)


def render(source: Path = SOURCE) -> str:
    groups = yaml.safe_load(source.read_text())["groups"]
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "editserve", "labels": {"app.kubernetes.io/name": "editserve"}},
        "spec": {"groups": groups},
    }
    return HEADER + yaml.dump(rule, Dumper=_Dumper, sort_keys=False, width=1000, allow_unicode=True)


def main() -> int:
    TARGET.write_text(render())
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
