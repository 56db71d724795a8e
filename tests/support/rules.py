"""The project's alert rules (ops/alerts.yml) as a test can run them: the same expressions,
labels and annotations, with a ``for:`` short enough to watch an alert fire in seconds."""

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from tests.support.paths import ROOT_DIR

__all__ = ("ALERTS", "alert_rules", "write_test_rules")

ALERTS = ROOT_DIR / "ops" / "alerts.yml"


def alert_rules(path: Path = ALERTS) -> dict[str, dict[str, Any]]:
    """Every alerting rule of ``path``, by alert name."""
    groups = yaml.safe_load(path.read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"] if "alert" in rule}


def write_test_rules(
    target: Path, names: Iterable[str], *, hold: str, source: Path = ALERTS
) -> dict[str, dict[str, Any]]:
    """A rule file at ``target`` holding the alerts ``names`` of ``source``, each with
    ``for: hold``; the rules written, by name. A name missing from ``source`` is an error."""
    rules = alert_rules(source)
    missing = [name for name in names if name not in rules]
    if missing:
        raise KeyError(f"not in {source}: {', '.join(missing)}")
    chosen = {name: {**rules[name], "for": hold} for name in names}
    target.write_text(
        yaml.safe_dump(
            {"groups": [{"name": "pulsecal-test", "rules": list(chosen.values())}]},
            sort_keys=False,
        )
    )
    return chosen
