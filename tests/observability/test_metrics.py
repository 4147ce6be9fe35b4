"""/metrics scraped by a real Prometheus (Debian's package), and its figures as requests come and go.

The token counters Prometheus reads must equal the usage the responses
reported; the gauges and histograms must move as a batch of concurrent
requests runs; the dashboard's queries must run on Prometheus against what
llamascope exposes.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry

from llamascope.observability.facts import Allowance, CacheStats, UpstreamHealth
from llamascope.observability.metrics import StateCollector
from tests.conftest import ADMIN_KEY, API_KEY, ROOT, Server, free_port, generation_body, png_bytes
from tests.observability.conftest import METRICS_KEY

pytestmark = pytest.mark.server
PATH = "/api/v1/services/aigc/multimodal-generation/generation"
DASHBOARD = ROOT / "docs" / "observability" / "grafana-dashboard.json"
ALERTS = ROOT / "docs" / "observability" / "alerts.yml"


@pytest.fixture(scope="module")
def server(observed: Server) -> Server:
    return observed


def scrape(server: Server) -> str:
    r = httpx.get(server.base + "/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return r.text


def settled(server: Server, before: str, requests: int) -> str:
    """A scrape once ``requests`` more requests (other than scrapes) are counted: a request is counted when
    its last byte is sent, which may be just after its client has read it."""
    deadline = time.monotonic() + 30
    while True:
        text = scrape(server)
        answered = answered_requests(text) - answered_requests(before)
        if answered >= requests or time.monotonic() > deadline:
            assert answered == requests
            return text
        time.sleep(0.05)


def answered_requests(text: str) -> float:
    lines = [x for x in text.splitlines() if x.startswith("llamascope:http_requests_total{")]
    return sum(float(x.rpartition(" ")[2]) for x in lines if 'route="/metrics"' not in x)


def value(text: str, series: str) -> float:
    """One series' value in an exposition ('name{label="x"}'), 0 if absent; labels in any order."""
    name, _, labels = series.partition("{")
    wanted = set(re.findall(r'(\w+)="([^"]*)"', labels))
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, number = line.rpartition(" ")
        line_name, _, line_labels = head.partition("{")
        if line_name == name and wanted <= set(re.findall(r'(\w+)="([^"]*)"', line_labels)):
            total += float(number)
    return total


def post(server: Server, body: dict, key: str = API_KEY, stream: bool = False) -> dict:
    headers = {"Authorization": f"Bearer {key}"}
    if not stream:
        r = httpx.post(server.base + PATH, json=body, headers=headers, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["usage"]
    usage = None
    headers["X-DashScope-SSE"] = "enable"
    with httpx.stream("POST", server.base + PATH, json=body, headers=headers, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data:"):
                usage = json.loads(line[5:])["usage"]
    assert usage is not None
    return usage


# -- Prometheus --------------------------------------------------------------------


class Prometheus:
    def __init__(self, tmp: Path, target: str) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.skip("prometheus is not installed (Debian package 'prometheus'; .ci/run installs it)")
        self.port = free_port()
        config = tmp / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"rule_files: ['{ALERTS}']\n"
            "scrape_configs:\n  - job_name: llamascope\n"
            f"    authorization:\n      credentials: {METRICS_KEY}\n"
            f"    static_configs:\n      - targets: ['{target}']\n"
        )
        self.log = open(tmp / "prometheus.log", "w")  # noqa: SIM115  # closed in stop()
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.base + "/-/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("prometheus did not start: " + (tmp / "prometheus.log").read_text()[-2000:])

    def query(self, promql: str) -> list[dict]:
        r = httpx.get(self.base + "/api/v1/query", params={"query": promql}, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", (promql, body)
        return body["data"]["result"]

    def scalar(self, promql: str) -> float | None:
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, promql: str, expected: float, seconds: float = 30) -> float | None:
        """The query's value once it equals ``expected`` (Prometheus scrapes every second), or the last seen."""
        deadline = time.monotonic() + seconds
        seen = None
        while time.monotonic() < deadline:
            seen = self.scalar(promql)
            if seen == expected:
                return seen
            time.sleep(0.5)
        return seen

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory, server: Server) -> Iterator[Prometheus]:
    prom = Prometheus(tmp_path_factory.mktemp("prometheus"), server.base.removeprefix("http://"))
    yield prom
    prom.stop()


@pytest.mark.prometheus
def test_prometheus_reads_token_counters_equal_to_the_reported_usage(
    server: Server, prometheus: Prometheus, image_host
) -> None:
    created = httpx.post(
        server.base + "/admin/keys",
        json={"name": "alice", "allowance_tokens": 100000},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    )
    assert created.status_code == 200, created.text
    alice = created.json()["data"]["api_key"]
    reported = {"input_tokens": 0, "output_tokens": 0, "image_tokens": 0}
    reported_alice = dict(reported)
    for i, (image, stream, key) in enumerate(
        [
            ("/red.png", False, API_KEY),
            ("/blue.png", True, alice),
            ("/red.png", True, API_KEY),
            ("/red.png", False, alice),
        ]
    ):
        usage = post(server, generation_body(image_host.url(image), max_tokens=5 + i, seed=i), key, stream)
        for name in reported:
            reported[name] += usage[name]
            if key == alice:
                reported_alice[name] += usage[name]
    model = 'model_name="llama3.2-90b-vision-instruct"'
    for metric, field in [
        ("prompt_tokens_total", "input_tokens"),
        ("generation_tokens_total", "output_tokens"),
        ("image_tokens_total", "image_tokens"),
    ]:
        promql = f"sum(llamascope:{metric}{{{model}}})"
        assert prometheus.wait_for(promql, reported[field]) == reported[field], promql
    for kind, field in [("input", "input_tokens"), ("output", "output_tokens"), ("image", "image_tokens")]:
        promql = f'sum(llamascope:key_tokens_total{{key_name="alice",kind="{kind}"}})'
        assert prometheus.wait_for(promql, reported_alice[field]) == reported_alice[field], promql
    assert prometheus.scalar('sum(llamascope:key_tokens_total{key_name="from settings"})') is None  # not opted in
    # alice's allowance: one grant of 100,000 for every model ("*", as a key made without models gets it),
    # her tokens charged to it whichever model she called.
    left = 100000 - reported_alice["input_tokens"] - reported_alice["output_tokens"]
    promql = 'llamascope:key_allowance_remaining_tokens{key_name="alice",model_name="*"}'
    assert prometheus.wait_for(promql, left) == left
    assert prometheus.scalar('llamascope:key_allowance_tokens{key_name="alice",model_name="*"}') == 100000
    assert prometheus.wait_for(f"sum(llamascope:request_success_total{{{model}}})", 4) == 4
    assert prometheus.scalar('sum(llamascope:image_fetch_seconds_count{source="url",format="PNG"})') == 4
    assert prometheus.scalar('sum(llamascope:http_requests_total{route="/admin/keys",status="200"})') == 1


@pytest.mark.prometheus
def test_refusals_count_by_code_and_routes_by_template(server: Server, prometheus: Prometheus, image_host) -> None:
    before = scrape(server)
    bad_key = httpx.post(server.base + PATH, json={}, headers={"Authorization": "Bearer sk-nope"})
    assert bad_key.status_code == 401
    for i in range(3):  # three raw paths, one route template
        r = httpx.post(f"{server.base}/admin/keys/{900 + i}/revoke", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert r.status_code == 400
    gif = post_raw(server, generation_body(image_host.url("/anim.gif")))
    assert gif.status_code == 400
    private = post_raw(server, generation_body("http://10.0.0.1/secret.png"))
    assert private.status_code == 400
    after = settled(server, before, 6)

    def delta(series: str) -> float:
        return value(after, series) - value(before, series)

    assert delta('llamascope:request_errors_total{code="InvalidApiKey"}') == 1
    assert (
        delta(
            'llamascope:http_requests_total{route="/api/v1/services/aigc/multimodal-generation/generation",status="401"}'
        )
        == 1
    )
    assert delta('llamascope:http_requests_total{route="/admin/keys/{ref}/revoke",status="400"}') == 3
    assert "/admin/keys/900/revoke" not in after  # never a raw path
    assert delta('llamascope:image_refusals_total{reason="format"}') == 1
    assert delta('llamascope:image_refusals_total{reason="source"}') == 1


def post_raw(server: Server, body: dict) -> httpx.Response:
    return httpx.post(server.base + PATH, json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)


def test_gauges_and_histograms_move_under_concurrent_requests(server: Server, image_host) -> None:
    model = 'model_name="llama3.2-90b-vision-instruct"'
    before = scrape(server)
    seen_running: list[float] = []
    seen_waiting: list[float] = []
    usages: list[dict] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            text = scrape(server)
            seen_running.append(value(text, f"llamascope:num_requests_running{{{model}}}"))
            seen_waiting.append(value(text, f"llamascope:num_requests_waiting{{{model}}}"))
            time.sleep(0.02)

    def one(i: int) -> None:
        body = generation_body(image_host.url("/red.png"), max_tokens=32, min_new_tokens=32, seed=i)
        usages.append(post(server, body, stream=True))

    watcher = threading.Thread(target=watch)
    watcher.start()
    clients = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for c in clients:
        c.start()
    for c in clients:
        c.join(120)
    done.set()
    watcher.join()
    assert len(usages) == 4
    assert max(seen_running) == 2  # the batch is full...
    assert max(seen_waiting) >= 1  # ...and the others wait
    after = settled(server, before, 4)
    assert value(after, f"llamascope:num_requests_running{{{model}}}") == 0  # all gone again
    assert value(after, f"llamascope:num_requests_waiting{{{model}}}") == 0

    def delta(series: str) -> float:
        return value(after, series) - value(before, series)

    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert delta(f"llamascope:{histogram}_count{{{model}}}") == 4, histogram
    for histogram in ("request_prefill_time_seconds", "request_decode_time_seconds"):
        assert delta(f"llamascope:{histogram}_count{{{model}}}") == 4, histogram
    generated = sum(u["output_tokens"] for u in usages)
    assert delta(f"llamascope:inter_token_latency_seconds_count{{{model}}}") == generated - 4  # all but the first
    assert delta(f"llamascope:generation_tokens_total{{{model}}}") == generated
    assert delta(f"llamascope:request_queue_time_seconds_sum{{{model}}}") > 0  # some waited
    # Inter-token latency has buckets from 1 ms; time to first token has buckets between 1 s and 2.5 s.
    assert 'llamascope:inter_token_latency_seconds_bucket{le="0.001"' in after
    assert all(f'le="{le}"' in after for le in ("1.25", "1.5", "2.0"))


# -- the dashboard and the alert rules ----------------------------------------------

METRIC_NAME = re.compile(r"\bllamascope:[a-zA-Z0-9_:]+")


def exposed_names(text: str) -> set[str]:
    """Every series name the exposition declares, also of families with no series yet (no upstream here)."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            names |= {name + "_bucket", name + "_sum", name + "_count"} if kind == "histogram" else {name}
    return names


@pytest.mark.prometheus
def test_dashboard_is_a_grafana_dashboard_whose_queries_run(server: Server, prometheus: Prometheus) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    # What Grafana's import needs (grafana/pkg/.../dashboard JSON model): a title, a schema version,
    # panels with a type, a title, a place on the grid and unique ids; the data source as an input.
    assert dashboard["title"] and isinstance(dashboard["schemaVersion"], int) and dashboard["uid"]
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    panels = [p for row in dashboard["panels"] for p in [row, *row.get("panels", [])]]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    exprs = []
    for panel in panels:
        assert panel["type"] in {"row", "timeseries", "stat", "gauge", "bargauge", "table", "heatmap"}, panel
        assert panel["title"]
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys() and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}" and panel["targets"], panel["title"]
            exprs += [t["expr"] for t in panel["targets"]]
    for variable in dashboard["templating"]["list"]:
        if variable.get("query"):
            exprs.append(str(variable["query"].get("query", variable["query"])))
    # Every metric a query names is one llamascope exposes (histograms as _bucket, _sum, _count).
    exposed = exposed_names(scrape(server))
    names = {name for expr in exprs for name in METRIC_NAME.findall(expr)}
    assert names - exposed == set(), f"the dashboard queries metrics that do not exist: {names - exposed}"
    assert len(names) >= 20
    # Every query parses and runs on Prometheus (Grafana's variables given values).
    for expr in exprs:
        if expr.startswith("label_values("):
            continue
        promql = expr.replace("$__rate_interval", "1m").replace("$model_name", ".*").replace("$__interval", "1m")
        prometheus.query(promql)


@pytest.mark.prometheus
def test_alert_rules_pass_promtool_and_name_existing_metrics(server: Server, prometheus: Prometheus) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package 'prometheus')")
    checked = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    exposed = exposed_names(scrape(server))
    names = set(METRIC_NAME.findall(ALERTS.read_text()))
    assert names and names - exposed == set(), names - exposed
    # Prometheus loaded the same file (the config names it): every rule is there and healthy.
    r = httpx.get(prometheus.base + "/api/v1/rules").json()
    rules = [rule for group in r["data"]["groups"] for rule in group["rules"]]
    alerts = {rule["name"] for rule in rules}
    assert {"LlamascopeQueueFull", "LlamascopeErrorRate", "LlamascopeTTFTp99", "LlamascopeAllowanceLow"} <= alerts
    assert "LlamascopeUpstreamDown" in alerts
    assert all(rule["health"] != "err" for rule in rules), rules


def test_prefix_cache_hits_and_queries_count_prompt_tokens(server: Server) -> None:
    """Two turns of one conversation about a new image: the second finds the first's prompt in the prefix
    cache. Hits and queries count prompt tokens (vLLM's meaning: hits / queries is the hit rate)."""
    model = 'model_name="llama3.2-90b-vision-instruct"'
    picture = "data:image/png;base64," + base64.b64encode(png_bytes((17, 99, 201), (300, 200))).decode()
    turn1 = [{"role": "user", "content": [{"image": picture}, {"text": "What is in this picture?"}]}]
    turn2 = [*turn1, {"role": "assistant", "content": [{"text": "A blue rectangle."}]}]
    turn2.append({"role": "user", "content": [{"text": "And its colour?"}]})
    before = scrape(server)
    first = post(
        server, {"model": "llama3.2-90b-vision-instruct", "input": {"messages": turn1}, "parameters": {"max_tokens": 2}}
    )
    second = post(
        server, {"model": "llama3.2-90b-vision-instruct", "input": {"messages": turn2}, "parameters": {"max_tokens": 2}}
    )
    after = settled(server, before, 2)

    def delta(name: str) -> float:
        return value(after, f"llamascope:{name}{{{model}}}") - value(before, f"llamascope:{name}{{{model}}}")

    assert delta("prefix_cache_queries_total") == first["input_tokens"] + second["input_tokens"]
    hits = delta("prefix_cache_hits_total")
    assert first["input_tokens"] - 16 < hits < second["input_tokens"] and hits % 16 == 0
    assert delta("prefix_cache_request_hits_total") == 1 and delta("prefix_cache_request_misses_total") == 1
    assert value(after, f"llamascope:prefix_cache_bytes{{{model}}}") <= value(
        after, f"llamascope:prefix_cache_max_bytes{{{model}}}"
    )


# -- the state a scrape reads, through the callables it is given (no server) ------------------------------


class ReportingEngine:
    """An engine as a scrape sees it: its stats and the upstreams it calls."""

    def __init__(self, stats: dict[str, int], upstreams: tuple[UpstreamHealth, ...] = ()) -> None:
        self._stats = stats
        self._upstreams = upstreams

    def stats(self) -> dict[str, int]:
        if not self._stats:
            raise RuntimeError("this engine cannot say")
        return self._stats

    def health(self) -> tuple[UpstreamHealth, ...]:
        return self._upstreams


def exposed(state: StateCollector) -> dict[str, float]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(state)  # type: ignore[arg-type]
    samples: dict[str, float] = {}
    for family in registry.collect():
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def test_state_collector_reports_each_engine_and_its_upstreams() -> None:
    gateway = ReportingEngine(
        {"running": 3, "healthy_upstreams": 1},
        (UpstreamHealth("http://user:secret@gpu1:30000/v1", True, 2), UpstreamHealth("http://gpu2:30000/v1", False, 1)),
    )
    local = ReportingEngine({"running": 1, "waiting": 4, "prefix_cache_tokens_reused": 96})
    broken = ReportingEngine({})  # its stats raise: the scrape goes on without it
    state = StateCollector(
        engines=lambda: {"gateway": gateway, "local": local, "broken": broken},
        image_cache=lambda: CacheStats(hits=5, misses=2, bytes=1024),
    )
    samples = exposed(state)
    assert samples['llamascope:num_requests_running{model_name="gateway"}'] == 3
    assert samples['llamascope:num_requests_waiting{model_name="local"}'] == 4
    assert samples['llamascope:prefix_cache_hits_total{model_name="local"}'] == 96
    assert samples['llamascope:upstream_healthy{model_name="gateway",upstream="http://gpu1:30000/v1"}'] == 1
    assert samples['llamascope:upstream_healthy{model_name="gateway",upstream="http://gpu2:30000/v1"}'] == 0
    outstanding = 'llamascope:upstream_outstanding_requests{model_name="gateway",upstream="http://gpu2:30000/v1"}'
    assert samples[outstanding] == 1
    assert not [name for name in samples if "broken" in name or "secret" in name]
    assert samples["llamascope:image_cache_hits_total{}"] == 5
    assert samples["llamascope:image_cache_bytes{}"] == 1024
    assert not [name for name in samples if "allowance" in name]  # no allowances given: no per-key figures


def test_state_collector_adds_up_a_keys_grants_per_model() -> None:
    def allowances() -> list[Allowance]:
        return [
            Allowance("alice", "*", 300, 1000, expires_at=2000.0),
            Allowance("alice", "*", 50, 100, expires_at=1500.0),
            Allowance("alice", "llama", 10, 10),
            Allowance("carol", "*", 0, 500),
        ]

    samples = exposed(StateCollector(engines=dict, allowances=allowances))
    assert samples['llamascope:key_allowance_remaining_tokens{key_name="alice",model_name="*"}'] == 350
    assert samples['llamascope:key_allowance_tokens{key_name="alice",model_name="*"}'] == 1100
    assert samples['llamascope:key_allowance_expires_timestamp_seconds{key_name="alice",model_name="*"}'] == 1500
    assert 'llamascope:key_allowance_expires_timestamp_seconds{key_name="alice",model_name="llama"}' not in samples
    assert samples['llamascope:key_allowance_remaining_tokens{key_name="carol",model_name="*"}'] == 0


def test_figures_read_from_the_store_are_taken_once_across_replicas() -> None:
    """New-user trial: with two replicas, the dashboard drew each named key's allowance twice and the
    allowance alerts fired once per replica: every replica reports the same figures, read from the shared
    store, so the queries take one of them per key and model (min or max by), never each or their sum."""
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for row in dashboard["panels"] for p in [row, *row.get("panels", [])]]
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    exprs += [str(rule["expr"]) for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]
    store_figures = [e for e in exprs if "key_allowance_" in e]
    assert len(store_figures) >= 3
    for expr in store_figures:
        for name in re.findall(r"llamascope:key_allowance_\w+", expr):
            assert re.search(rf"(min|max) by \(key_name, model_name\) \({re.escape(name)}\b", expr), (name, expr)
