"""The alert rules evaluated by Prometheus's own rule engine (``promtool test rules``) on series made up here."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

ALERTS = Path(__file__).resolve().parents[2] / "docs" / "observability" / "alerts.yml"
API = 'route="/api/v1/services/aigc/multimodal-generation/generation", method="POST"'


def promtool_test(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package 'prometheus')")
    tests = tmp_path / "alerts_test.yml"
    tests.write_text(text.replace("ALERTS", str(ALERTS)))
    return subprocess.run([promtool, "test", "rules", str(tests)], capture_output=True, text=True)


def test_error_rate_counts_the_api_not_the_health_checks_and_scrapes(tmp_path: Path) -> None:
    # One API request in 11 fails (9%), while a load balancer checks /health twice a second and Prometheus
    # scrapes every 15 s: the API's error rate is what fires, however many probes come in between.
    result = promtool_test(
        tmp_path,
        f"""
rule_files: [ALERTS]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'llamascope:http_requests_total{{instance="a", {API}, status="200"}}'
        values: '0+10x30'
      - series: 'llamascope:http_requests_total{{instance="a", {API}, status="500"}}'
        values: '0+1x30'
      - series: 'llamascope:http_requests_total{{instance="a", route="/health", method="GET", status="200"}}'
        values: '0+120x30'
      - series: 'llamascope:http_requests_total{{instance="a", route="/metrics", method="GET", status="200"}}'
        values: '0+4x30'
    alert_rule_test:
      - eval_time: 20m
        alertname: LlamascopeErrorRate
        exp_alerts:
          - exp_labels: {{severity: critical, instance: a}}
            exp_annotations:
              summary: "llamascope a: 9.091% of requests fail"
""",
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_error_rate_counts_the_api_as_the_alert_does(tmp_path: Path) -> None:
    dashboard = json.loads((ALERTS.parent / "grafana-dashboard.json").read_text())
    exprs = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", ())
        if 'status=~"5.."' in target.get("expr", "")
    ]
    assert exprs
    for expr in exprs:
        promql = expr.replace("$__rate_interval", "5m").replace("\\", "\\\\").replace('"', '\\"')
        result = promtool_test(
            tmp_path,
            f"""
tests:
  - interval: 1m
    input_series:
      - series: 'llamascope:http_requests_total{{instance="a", {API}, status="200"}}'
        values: '0+3x30'
      - series: 'llamascope:http_requests_total{{instance="a", {API}, status="500"}}'
        values: '0+1x30'
      - series: 'llamascope:http_requests_total{{instance="a", route="/health", method="GET", status="200"}}'
        values: '0+120x30'
    promql_expr_test:
      - expr: "{promql}"
        eval_time: 20m
        exp_samples:
          - labels: '{{}}'
            value: 0.25
""",
        )
        assert result.returncode == 0, result.stdout + result.stderr
