"""Render the Grafana dashboard as a PNG from a live Prometheus, without Grafana.

A stand-in for a Grafana screenshot where no Grafana runs (this project's CI machines have no Docker):
it reads ``deploy/grafana/dashboards/slimserve.json``, runs every panel's PromQL against Prometheus'
HTTP API (range queries for time series, instant queries for stats and tables), and lays the panels out
on the dashboard's own 24-column grid with matplotlib.

    python deploy/grafana/render_snapshot.py --prometheus http://127.0.0.1:9090 --minutes 15 --out dash.png
"""

from __future__ import annotations

import argparse
import json
import re
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first

DASHBOARD = Path(__file__).resolve().parent / "dashboards" / "slimserve.json"
GRID_COLUMNS = 24
ROW_HEIGHT_IN = 0.42
FIGURE_WIDTH_IN = 20.0
LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def expand(expr: str, rate_interval: str = "1m", model: str = ".*") -> str:
    """Substitute the dashboard's variables the way Grafana would."""
    return expr.replace("$__rate_interval", rate_interval).replace("$model", model)


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression in the dashboard: panel targets and annotations."""
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    return exprs + [a["expr"] for a in dashboard.get("annotations", {}).get("list", []) if "expr" in a]


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def get(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=30) as response:
            body = json.load(response)
        if body.get("status") != "success":
            raise RuntimeError(f"Prometheus {path} {params}: {body}")
        return body["data"]

    def instant(self, expr: str) -> list[dict[str, Any]]:
        return self.get("/api/v1/query", query=expr)["result"]

    def range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        return self.get("/api/v1/query_range", query=expr, start=str(start), end=str(end), step=str(step))["result"]


def legend(template: str, labels: dict[str, str]) -> str:
    """Grafana's legend format: ``{{label}}`` is the series' label value, empty when it has none."""
    return LEGEND_LABEL.sub(lambda match: labels.get(match.group(1), ""), template).strip()


def render(prometheus: Prometheus, out: Path, minutes: float, dashboard_path: Path = DASHBOARD) -> Path:
    dashboard = json.loads(dashboard_path.read_text())
    panels = dashboard["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    height = rows * ROW_HEIGHT_IN
    figure = plt.figure(figsize=(FIGURE_WIDTH_IN, height))
    figure.suptitle(f"{dashboard['title']}  (rendered from Prometheus by render_snapshot.py)", fontsize=13)
    end = time.time()
    start = end - minutes * 60
    step = max(1.0, (end - start) / 200)
    for panel in panels:
        grid = panel["gridPos"]
        box = (
            grid["x"] / GRID_COLUMNS + 0.03,
            1 - (grid["y"] + grid["h"]) / rows + 0.02,
            grid["w"] / GRID_COLUMNS - 0.04,
            grid["h"] / rows - 0.045,
        )
        if panel["type"] == "row":
            figure.text(0.005, 1 - (grid["y"] + 0.9) / rows, panel["title"], fontsize=12, weight="bold")
            continue
        axes = figure.add_axes(box)
        axes.set_title(panel["title"], fontsize=10, loc="left")
        if panel["type"] == "timeseries":
            _draw_series(axes, prometheus, panel, start, end, step)
        else:
            _draw_values(axes, prometheus, panel)
    figure.savefig(out, dpi=80)
    plt.close(figure)
    return out


def _draw_series(
    axes: Any, prometheus: Prometheus, panel: dict[str, Any], start: float, end: float, step: float
) -> None:
    for target in panel["targets"]:
        for series in prometheus.range(expand(target["expr"]), start, end, step):
            times = [(float(t) - end) / 60 for t, _ in series["values"]]
            values = [float(v) for _, v in series["values"]]
            axes.plot(times, values, label=legend(target["legendFormat"], series["metric"]))
    axes.set_xlabel("minutes ago", fontsize=8)
    axes.tick_params(labelsize=8)
    unit = panel["fieldConfig"]["defaults"].get("unit")
    if unit:
        axes.set_ylabel(unit, fontsize=8)
    if axes.lines:
        axes.legend(fontsize=7, loc="upper left")


def _draw_values(axes: Any, prometheus: Prometheus, panel: dict[str, Any]) -> None:
    """Stats and tables: the current value of every series, as text."""
    lines = []
    for target in panel["targets"]:
        for series in prometheus.instant(expand(target["expr"])):
            name = legend(target["legendFormat"], series["metric"])
            value = float(series["value"][1])
            if panel["type"] == "stat" and panel.get("options", {}).get("textMode") == "name":
                lines.append(name)
            elif panel["type"] == "table":
                lines.append(f"{series['metric'].get('variant', '')}  {name}: {value:.6g}")
            else:
                lines.append(f"{value:.3g}")
    axes.axis("off")
    size = 18 if panel["type"] == "stat" else 9
    axes.text(0.02, 0.85, "\n".join(lines) or "no data", fontsize=size, va="top", family="monospace")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090")
    parser.add_argument("--minutes", type=float, default=15)
    parser.add_argument("--out", type=Path, default=Path("dashboard.png"))
    args = parser.parse_args(argv)
    print(render(Prometheus(args.prometheus), args.out, args.minutes))


if __name__ == "__main__":
    main()
