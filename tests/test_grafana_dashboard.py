"""deploy/grafana/rlhf.json charts every Ray gauge RayMetricsReporter exports, filtered by the
tenant, job and stage tags it sets (test_trackers.py checks those tags on a live Ray head)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from orchestrator.reporting.reporters import RayMetricsReporter

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "rlhf.json"


def test_dashboard_charts_every_gauge_by_tenant_job_and_stage():
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for tag in RayMetricsReporter.TAGS:
        assert f", {tag})" in variables[tag]["query"]["query"] and variables[tag]["includeAll"], tag

    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    charted = set()
    for panel in panels:
        assert panel["title"] and panel["description"], panel["id"]
        for target in panel["targets"]:
            # Ray exports a custom metric NAME to Prometheus as ray_NAME, with the tags as labels.
            (metric,) = re.findall(r"\bray_(rlhf_\w+)\{", target["expr"])
            selector = target["expr"].split("{", 1)[1].split("}", 1)[0]
            assert {f'{tag}=~"${tag}"' for tag in RayMetricsReporter.TAGS} <= {s.strip() for s in selector.split(",")}, target["expr"]
            charted.add(metric)
    exported = {"rlhf_step"} | {"rlhf_" + name.replace("/", "_") for name in RayMetricsReporter.HEADLINE}
    assert charted == exported

    # Panels tile the 24-column grid without overlapping.
    cells = set()
    for panel in dash["panels"]:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, panel["title"]
        cells |= mine
