"""Write the prometheus-operator component's PrometheusRule from ops/alerts.yml: the same groups.

Run after editing ops/alerts.yml: ``python ops/sync_rules.py`` (``--check`` only compares and
exits 1 when the file is out of date). The groups are copied as text, comments included. The
file is k8s/components/prometheus-operator/prometheusrule.yaml: an optional kustomize component,
out of k8s/base, so clusters without the operator's CRDs can apply the overlays.
"""

import argparse
import sys
from pathlib import Path

__all__ = ("main", "render")

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "ops" / "alerts.yml"
TARGET = ROOT / "k8s" / "components" / "prometheus-operator" / "prometheusrule.yaml"

_HEADER = """\
# GENERATED from ops/alerts.yml by `python ops/sync_rules.py`: edit that file, not this one.
# The same rules for a Prometheus run by the prometheus-operator (tests/deploy/test_ops.py checks
# that the two agree). Part of the optional component k8s/components/prometheus-operator (see
# docs/deploy.md). Your Prometheus resource may select rules by a label (e.g. `release`): add
# it in an overlay.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: pulsecal
  labels:
    app.kubernetes.io/part-of: pulsecal
spec:
"""


def render(alerts_text: str) -> str:
    lines = alerts_text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("groups:"))
    body = [f"  {line}" if line.strip() else "" for line in lines[start:]]
    return _HEADER + "\n".join(body) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 if stale")
    args = parser.parse_args()
    wanted = render(ALERTS.read_text())
    if args.check:
        if TARGET.read_text() != wanted:
            sys.exit(f"{TARGET.relative_to(ROOT)} is stale: run python ops/sync_rules.py")
        return
    TARGET.write_text(wanted)


if __name__ == "__main__":
    main()
