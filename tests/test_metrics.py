"""The metrics as users chart them: a real Prometheus scraping a real run, and the shipped
Grafana dashboard (dashboards/dqn.json) asking only for series the project exports."""
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from common import metrics
from tests.conftest import ROOT, free_port

DASHBOARD = ROOT / "dashboards" / "dqn.json"
# What Grafana substitutes in the dashboard's queries, for running them against Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "30s", "$SessionName": ".+"}
SCRAPE_INTERVAL = "1s"


def dashboard_queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [target["expr"] for panel in panels for target in panel.get("targets", [])]


def names_in(expr: str) -> set[str]:
    return set(re.findall(r"\bray_[a-zA-Z0-9_]+", expr))


def test_dashboard_charts_only_what_the_project_exports():
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    charts = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    assert len(charts) >= 12
    for panel in charts:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
    queried = set().union(*map(names_in, dashboard_queries()))
    assert queried <= metrics.prometheus_names(), queried - metrics.prometheus_names()
    # Every metric a role exports is on a chart (histograms through any of their parts).
    charted = {re.sub(r"^ray_|_(total|bucket|sum|count)$", "", name) for name in queried}
    assert charted == set(metrics.DESCRIPTIONS), set(metrics.DESCRIPTIONS) - charted


def test_every_name_belongs_to_one_role_with_its_tags():
    owned = [name for names in metrics.ROLES.values() for name in names]
    assert sorted(owned) == sorted(metrics.DESCRIPTIONS)  # each name once, each has a role
    assert metrics.role_tags(metrics.ACTOR, 3) == {"role": "actor", "actor": "3"}
    assert metrics.role_tags(metrics.REPLAY, 0) == {"role": "replay", "shard": "0"}
    assert metrics.role_tags(metrics.LEARNER) == {"role": "learner"}
    with pytest.raises(ValueError):
        metrics.role_tags(metrics.ACTOR)
    assert f"ray_{metrics.EVAL_RETURN_MEAN}" in metrics.prometheus_names()
    assert {f"ray_{metrics.EPISODE_RETURN}_{part}" for part in ("bucket", "sum", "count")} \
        <= metrics.prometheus_names()


# A real Prometheus.
class Prometheus:
    def __init__(self, url: str, process: subprocess.Popen, log: Path):
        self.url, self.process, self.log = url, process, log

    def api(self, path: str, **params) -> dict:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params, doseq=True)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                answer = json.load(response)
        except urllib.error.HTTPError as error:  # a bad query answers 400 with its reason
            answer = json.load(error)
        assert answer["status"] == "success", f"{params}: {answer}"
        return answer["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def series(self, selector: str, window: str = "10m") -> dict[frozenset, list[float]]:
        """Every series `selector` matched in the last `window`, labels to values (a range
        query: series of processes that have exited count too)."""
        return {frozenset(item["metric"].items()): [float(v) for _, v in item["values"]]
                for item in self.query(f"{selector}[{window}]")}


def ray_prometheus_config(session_dir: Path, workdir: Path) -> Path:
    """Ray's Prometheus config for this session, scraping every SCRAPE_INTERVAL.

    Ray's dashboard writes it to <session_dir>/metrics/prometheus/prometheus.yml, reading the
    nodes from file service discovery at <session_dir>/prom_metrics_service_discovery.json
    (linked from /tmp/ray/, which names whichever session started last on the machine). The
    tests' Ray runs without a dashboard, so then both are written here as Ray writes them."""
    generated = session_dir / "metrics" / "prometheus" / "prometheus.yml"
    if generated.exists():
        config = yaml.safe_load(generated.read_text())
    else:
        import ray
        from ray.dashboard.modules.metrics.templates import PROMETHEUS_YML_TEMPLATE
        discovery = workdir / "prom_metrics_service_discovery.json"
        targets = [f"{node['NodeManagerAddress']}:{node['MetricsExportPort']}"
                   for node in ray.nodes() if node["Alive"]]
        discovery.write_text(json.dumps([{"labels": {"job": "ray"}, "targets": targets}]))
        config = yaml.safe_load(PROMETHEUS_YML_TEMPLATE.format(
            prom_metrics_service_discovery_file_path=discovery))
    config["global"].update(scrape_interval=SCRAPE_INTERVAL, scrape_timeout=SCRAPE_INTERVAL,
                            evaluation_interval=SCRAPE_INTERVAL)
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def prometheus(request, tmp_path):
    """Prometheus on this Ray session's config, once it has scraped every node; killed after."""
    binary = shutil.which("prometheus")
    if binary is None:
        reason = ("the `prometheus` binary is not on PATH (Debian: apt-get install prometheus; "
                  ".ci/run installs it)")
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but {reason}")
        pytest.skip(reason)
    request.getfixturevalue("ray_address")  # Ray is up (only once there is a Prometheus)
    import ray
    workdir = tmp_path / "prometheus"
    workdir.mkdir()
    config = ray_prometheus_config(Path(ray._private.worker._global_node.get_session_dir_path()),
                                   workdir)
    port = free_port()
    log = workdir / "prometheus.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=out, stderr=subprocess.STDOUT, cwd=workdir)
    server = Prometheus(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + 30
        while True:  # ready, and its first scrape of every node landed
            assert process.poll() is None, log.read_text()[-3000:]
            try:
                up = server.query('up{job="ray"}')
                if up and all(item["value"][1] == "1" for item in up):
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# (selector, what its new series must show): each role's series carry its tags.
EXPECTED = [
    (f'ray_{metrics.AGENT_STEPS}_total{{role="actor",actor="0"}}', "positive"),
    (f'ray_{metrics.AGENT_STEPS}_total{{role="actor",actor="1"}}', "positive"),
    (f'ray_{metrics.ENV_FRAMES}_total{{role="actor",actor="0"}}', "positive"),
    (f'ray_{metrics.EPISODES}_total{{role="actor"}}', "positive"),
    (f'ray_{metrics.EPISODE_RETURN}_count{{role="actor"}}', "positive"),
    (f'ray_{metrics.EPISODE_RETURN}_bucket{{role="actor",le="+Inf"}}', "positive"),
    (f'ray_{metrics.EPSILON}{{role="actor",actor="1"}}', "positive"),
    (f'ray_{metrics.ACTOR_WEIGHT_VERSION}{{role="actor",actor="0"}}', "present"),
    (f'ray_{metrics.UPDATES}_total{{role="learner"}}', "positive"),
    (f'ray_{metrics.WEIGHT_VERSION}{{role="learner"}}', "positive"),
    (f'ray_{metrics.LOSS}{{role="learner"}}', "present"),
    (f'ray_{metrics.Q_MEAN}{{role="learner"}}', "present"),
    (f'ray_{metrics.EVAL_RETURN_MEAN}{{role="evaluator"}}', "positive"),
    (f'ray_{metrics.REPLAY_SIZE}{{role="replay",shard="0"}}', "positive"),
    (f'ray_{metrics.REPLAY_INSERTS}_total{{role="replay",shard="0"}}', "positive"),
    (f'ray_{metrics.REPLAY_SAMPLES_PER_INSERT}{{role="replay",shard="0"}}', "positive"),
]


def test_prometheus_scrapes_a_run_and_the_dashboard_queries_answer(prometheus, ray_address,
                                                                   tmp_path):
    """Prometheus on Ray's config scrapes a short CartPole run: every role's metrics arrive
    with their tags, and every dashboard query is valid PromQL that, once the series it
    names exist, returns data."""
    before = set(prometheus.series('{__name__=~"ray_dqn_.*"}'))  # earlier tests' workers
    queries = {expr: expr for expr in dashboard_queries()}
    for expr in queries:
        for variable, value in GRAFANA_VARIABLES.items():
            queries[expr] = queries[expr].replace(variable, value)
    answered: set[str] = set()
    missing: list[str] = [selector for selector, _ in EXPECTED]
    run = subprocess.Popen(
        [sys.executable, "launch.py", "--preset", "cartpole", "--address", ray_address,
         "--num-actors", "2", "--max-seconds", "25", "--eval-every-s", "5",
         "--logdir", str(tmp_path / "run")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            time.sleep(2)
            finished = run.poll() is not None
            missing = []
            for selector, want in EXPECTED:
                new = [values for labels, values in prometheus.series(selector).items()
                       if labels not in before]
                if not new or (want == "positive" and max(map(max, new)) <= 0):
                    missing.append(selector)
            for expr, query in queries.items():  # each answers while its series are live
                if expr not in answered and prometheus.query(query):
                    answered.add(expr)
            if finished or (not missing and len(answered) == len(queries)):
                break
        out, err = run.communicate(timeout=90)
    finally:
        run.kill()  # a no-op once it has stopped; else it must not outlive the test
    assert run.returncode == 0, err[-3000:]
    assert not missing, f"not in Prometheus: {missing}\n{out[-1500:]}"
    exported = {item["__name__"] for item in prometheus.api(
        "series", **{"match[]": '{__name__=~"ray_dqn_.*"}'})}
    silent = [expr for expr in queries if expr not in answered and names_in(expr) <= exported]
    assert not silent, f"dashboard queries with no data although their series exist: {silent}"
