"""Counters for everything bootd sees: received, answered, ignored (with reason), malformed.

A flat dict keyed by (component, name, labels) so every protocol can count without declaring first;
exposed as JSON on /api/v1/metrics and as Prometheus text on /metrics.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable


class Metrics:
    def __init__(self) -> None:
        self._counters: dict[tuple[str, str, tuple[tuple[str, str], ...]], float] = defaultdict(float)
        self._gauges: dict[str, Callable[[], dict[str, float]]] = {}

    def inc(self, component: str, name: str, value: float = 1, **labels: str) -> None:
        self._counters[(component, name, tuple(sorted(labels.items())))] += value

    def get(self, component: str, name: str, **labels: str) -> float:
        return self._counters.get((component, name, tuple(sorted(labels.items()))), 0)

    def add_gauges(self, component: str, fn: Callable[[], dict[str, float]]) -> None:
        """Register a function returning current values (e.g. active sessions) read at export time."""
        self._gauges[component] = fn

    def snapshot(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for (component, name, labels), value in sorted(self._counters.items()):
            comp = out.setdefault(component, {})
            if labels:
                key = name + "{" + ",".join(f"{k}={v}" for k, v in labels) + "}"
            else:
                key = name
            comp[key] = value
        for component, fn in self._gauges.items():
            try:
                for k, v in fn().items():
                    out.setdefault(component, {})[k] = v
            except Exception:  # a gauge must never break the metrics page
                pass
        return out

    def prometheus(self) -> str:
        lines = []
        for (component, name, labels), value in sorted(self._counters.items()):
            lab = ",".join(f'{k}="{_esc(v)}"' for k, v in labels)
            lines.append(f"bootd_{component}_{name}_total{{{lab}}} {value:g}")
        for component, fn in self._gauges.items():
            try:
                for k, v in fn().items():
                    lines.append(f"bootd_{component}_{k} {v:g}")
            except Exception:
                pass
        return "\n".join(lines) + "\n"


def _esc(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
