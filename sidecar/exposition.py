"""The Prometheus text format (0.0.4) and OpenMetrics 1.0, written straight from plain data.

prometheus_client renders through a ``Metric`` and a ``Sample`` object per line; with tens
of thousands of histogram lines that is most of a scrape's cost, so the families here are
plain data and the writer formats each line once (BENCHMARKS.md, "Sidecar").
"""

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from .aggregate import Exemplar

__all__ = (
    "OPENMETRICS",
    "TEXT",
    "Family",
    "Histogram",
    "Kind",
    "label_text",
    "render",
    "wants_openmetrics",
)

TEXT = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"

Kind = Literal["counter", "gauge", "histogram", "info"]


@dataclass(frozen=True, slots=True)
class Histogram:
    labels: str  # rendered by label_text
    counts: Sequence[int]  # per bucket, not cumulative, +Inf last
    sum: float
    exemplars: Sequence[Exemplar | None] | None = None


@dataclass(slots=True)
class Family:
    """One metric family. Counters are named without ``_total``; info without ``_info``."""

    name: str
    kind: Kind
    help: str
    samples: list[tuple[str, float]] = field(default_factory=list)  # (labels, value)
    histograms: list[Histogram] = field(default_factory=list)
    bounds: Sequence[float] = ()  # histogram bucket upper bounds, +Inf left implicit


def _escape(value: str) -> str:
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value


def label_text(labels: Iterable[tuple[str, object]]) -> str:
    """``a="x",b="y"``: label values escaped, ready to put between braces."""
    return ",".join(f'{name}="{_escape(str(value))}"' for name, value in labels)


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(value)


def _braced(labels: str) -> str:
    return f"{{{labels}}}" if labels else ""


def wants_openmetrics(accept: str) -> bool:
    """Whether an ``Accept`` header asks for OpenMetrics (with a non-zero quality)."""
    for part in accept.split(","):
        media, *params = (p.strip() for p in part.split(";"))
        if media.lower() != "application/openmetrics-text":
            continue
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    if float(value) <= 0:
                        break
                except ValueError:
                    break
        else:
            return True
    return False


def _write_histogram(out: list[str], family: Family, *, openmetrics: bool) -> None:
    name = family.name
    les = [_number(float(b)) for b in family.bounds] + ["+Inf"]
    bucket = f"{name}_bucket{{"
    for h in family.histograms:
        prefix = f"{bucket}{h.labels}," if h.labels else bucket
        cumulative = 0
        exemplars = h.exemplars if openmetrics else None
        for i, count in enumerate(h.counts):
            cumulative += count
            line = f'{prefix}le="{les[i]}"}} {cumulative}'
            if exemplars is not None and (ex := exemplars[i]) is not None:
                line += (
                    f' # {{trace_id="{_escape(ex.trace_id)}"}}'
                    f" {_number(ex.value_s)} {ex.timestamp_s:.3f}"
                )
            out.append(line)
        braced = _braced(h.labels)
        out.append(f"{name}_sum{braced} {_number(h.sum)}")
        out.append(f"{name}_count{braced} {cumulative}")


def render(families: Iterable[Family], *, openmetrics: bool) -> bytes:
    out: list[str] = []
    for family in families:
        name = family.name
        kind = family.kind
        help_text = family.help.replace("\\", "\\\\").replace("\n", "\\n")
        if kind == "counter":
            header = name if openmetrics else f"{name}_total"
            suffix = "_total"
        elif kind == "info":
            header = name if openmetrics else f"{name}_info"
            suffix = "_info"
        else:
            header = name
            suffix = ""
        shown_kind = "gauge" if kind == "info" and not openmetrics else kind
        out.append(f"# HELP {header} {help_text}")
        out.append(f"# TYPE {header} {shown_kind}")
        if kind == "histogram":
            _write_histogram(out, family, openmetrics=openmetrics)
            continue
        sample_name = name + suffix
        for labels, value in family.samples:
            out.append(f"{sample_name}{_braced(labels)} {_number(value)}")
    if openmetrics:
        out.append("# EOF")
    out.append("")
    return "\n".join(out).encode()
