"""Pictures of the review: one PNG per ProtectedService (granted vs used rules; requests per
grant over time). Needs matplotlib, an optional extra: `pip install 'nhigate[plots]'`."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nhigate.review.report import GrantReview, Review

INSTALL_HINT = "pip install 'nhigate[plots]'  (or: pip install matplotlib==3.11.2)"


class PlotsUnavailable(RuntimeError):  # noqa: N818 (a state, not a failure of the caller)
    """matplotlib is not installed."""


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend; `PlotsUnavailable` when missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, never a display
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotsUnavailable(f"--plots needs matplotlib: {INSTALL_HINT}") from None
    return plt


def _file_name(service: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", service.replace("/", "__")) + ".png"


def _rule_counts(g: GrantReview) -> tuple[int, int]:
    """(granted, used) method x path-pattern pairs of the grant's HTTP rules, plus MCP rules."""
    granted = used = 0
    for rule, usage in zip(g.usage.grant.rules, g.usage.rules, strict=True):
        if rule.mcp is not None:
            granted += 1
            used += 1 if g.usage.mcp_requests else 0
            continue
        granted += len(rule.methods) * len(rule.paths)
        used += len({(p, m) for (p, m) in usage.shapes})
    return granted, used


def render_plots(review: Review, directory: Path) -> list[Path]:
    """Write one PNG per service into `directory`; returns the files written."""
    plt = pyplot()
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for service in review.services:
        grants = [g for g in review.grants if g.service == service]
        figure, (bars, lines) = plt.subplots(
            2, 1, figsize=(10, 4 + 0.4 * len(grants)), constrained_layout=True
        )
        names = [g.grant.name for g in grants]
        counts = [_rule_counts(g) for g in grants]
        ys = list(range(len(grants)))
        bars.barh([y + 0.2 for y in ys], [c[0] for c in counts], 0.4, label="granted")
        bars.barh([y - 0.2 for y in ys], [c[1] for c in counts], 0.4, label="used")
        bars.set_yticks(ys, names)
        bars.invert_yaxis()
        bars.set_xlabel("method x path pattern pairs (MCP rule: 1)")
        bars.set_title(f"{service}: granted vs used rules")
        bars.xaxis.get_major_locator().set_params(integer=True)
        bars.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
        for g in grants:
            points = g.usage.series.points()
            if points:
                times = [datetime.fromtimestamp(t, UTC) for t, _ in points]
                per_minute = [c / (g.usage.series.width / 60.0) for _, c in points]
                lines.plot(times, per_minute, marker=".", label=g.grant.name)
        lines.set_title("requests per grant over time")
        lines.set_ylabel("requests / minute")
        lines.set_xlabel("time (UTC)")
        if any(g.usage.requests for g in grants):
            lines.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
        path = directory / _file_name(service)
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    return written
