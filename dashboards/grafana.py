"""A small Grafana dashboard builder: the panels llm-cluster's dashboards use, laid out on the grid.

  1. A panel is a `timeseries` or `stat` of `Query`s (PromQL + legend); every query reads the
     `$datasource` variable, and every selector of ours carries `model=~"$model"` (STYLE rule 19).
  2. `dashboard(...)` takes rows of panels, gives each an id and a grid position (two panels a row unless
     a panel asks for another width) and adds the datasource and model variables (and any others).
  3. The JSON is what Grafana 10-12 saves (schemaVersion 39); tests/dashboards type-check it against
     npm's `@grafana/schema` and run every query against a real Prometheus.
"""
from __future__ import annotations

from dataclasses import dataclass, field

SCHEMA_VERSION = 39
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"  # rate() window: Grafana's choice from the scrape interval and the step
M = 'model=~"$model"'  # the model filter every selector of ours carries


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""


@dataclass
class Panel:
    title: str
    queries: list[Query]
    kind: str = "timeseries"  # timeseries | stat
    unit: str = "short"
    description: str = ""
    width: int = 12  # of the grid's 24 columns
    thresholds: list[tuple[float | None, str]] = field(default_factory=lambda: [(None, "green")])
    max_value: float | None = None
    optional: str = ""  # why the panel may show nothing in a healthy cluster (tests/dashboards reads it)

    def to_json(self, panel_id: int, x: int, y: int, height: int) -> dict:
        defaults: dict = {"unit": self.unit, "thresholds": {
            "mode": "absolute", "steps": [{"color": color, "value": value} for value, color in self.thresholds]}}
        if self.max_value is not None:
            defaults["max"] = self.max_value
        if self.kind == "timeseries":
            defaults["custom"] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 0, "showPoints": "never",
                                  "spanNulls": True, "thresholdsStyle": {"mode": "line" if len(self.thresholds) > 1 else "off"}}
        options = ({"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"}} if self.kind == "timeseries" else
                   {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "colorMode": "value", "graphMode": "area", "textMode": "auto", "orientation": "auto"})
        return {
            "id": panel_id, "type": self.kind, "title": self.title, "description": self.description,
            "datasource": DATASOURCE, "gridPos": {"h": height, "w": self.width, "x": x, "y": y},
            "fieldConfig": {"defaults": defaults, "overrides": []}, "options": options,
            "targets": [{"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": q.expr,
                         "legendFormat": q.legend or "__auto", "range": True} for i, q in enumerate(self.queries)],
        }


def query_variable(name: str, label: str, query: str) -> dict:
    return {"name": name, "label": label, "type": "query", "datasource": DATASOURCE,
            "query": {"query": query, "refId": f"{name}-variable"},
            "includeAll": True, "multi": True, "refresh": 2, "sort": 1,
            "current": {"text": ["All"], "value": ["$__all"]}}


def link(title: str, uid: str) -> dict:
    """A link to another of our dashboards that keeps the time range and the variables."""
    return {"title": title, "type": "link", "url": f"/d/{uid}", "asDropdown": False, "icon": "dashboard",
            "includeVars": True, "keepTime": True, "tags": [], "targetBlank": False, "tooltip": ""}


def dashboard(uid: str, title: str, description: str, rows: list[tuple[str, list[Panel]]],
              variables: tuple[dict, ...] = (), links: tuple[dict, ...] = ()) -> dict:
    panels: list[dict] = []
    y, panel_id = 0, 1
    for row_title, row_panels in rows:
        panels.append({"id": panel_id, "type": "row", "title": row_title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        panel_id, y, x = panel_id + 1, y + 1, 0
        for panel in row_panels:
            if x + panel.width > 24:
                x, y = 0, y + 8
            panels.append(panel.to_json(panel_id, x, y, height=8))
            panel_id, x = panel_id + 1, x + panel.width
        y += 8
    templating = [
        {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
         "current": {"text": "default", "value": "default"}},
        query_variable("model", "model", "label_values(llm_cluster_pool_size, model)"),
        *variables,
    ]
    return {
        "uid": uid, "title": title, "description": description, "tags": ["llm-cluster"],
        "schemaVersion": SCHEMA_VERSION, "version": 1, "editable": True, "graphTooltip": 1,
        "refresh": "30s", "time": {"from": "now-3h", "to": "now"}, "timezone": "browser",
        "templating": {"list": templating}, "annotations": {"list": []}, "links": list(links),
        "panels": panels,
    }
