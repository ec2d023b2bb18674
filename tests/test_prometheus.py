"""opdplus's custom metrics on Ray's Prometheus endpoint, scraped from a running job, and the
Grafana dashboard that plots them."""

from __future__ import annotations

import json
import math
import re
import time
import types
import urllib.request

import pytest

from services.metrics import STEP_GAUGES, WORKER_GAUGES
from tests.ray_cluster import REPO, live_job

_LINE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?P<labels>.*)\})? (?P<value>\S+)")


def parse_prometheus(text: str) -> dict[str, list[tuple[dict, float]]]:
    """Prometheus text format → {metric name: [(labels, value)]}."""
    out: dict[str, list[tuple[dict, float]]] = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m or line.startswith("#"):
            continue
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m["labels"] or ""))
        out.setdefault(m["name"], []).append((labels, float(m["value"])))
    return out


def test_grafana_dashboard_plots_every_metric():
    dash = json.loads((REPO / "deploy/grafana/opdplus.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    for name in [*STEP_GAUGES, *WORKER_GAUGES]:
        assert f"ray_{name}{{" in exprs, f"no panel for {name}"
    for p in dash["panels"]:
        assert p["datasource"]["uid"] == "${datasource}" and p["gridPos"]["w"] > 0
    assert {v["name"] for v in dash["templating"]["list"]} == {"datasource", "run"}


# Sane ranges for a short toy run (max_staleness 1, nothing restarted).
def _sane(name: str, v: float) -> bool:
    checks = {
        "opdplus_step": v >= 1,
        "opdplus_samples_per_s": v > 0,
        "opdplus_tokens_per_s": v > 0,
        "opdplus_channel_depth": 0 <= v <= 64,
        "opdplus_staleness_mean": 0 <= v <= 1,
        "opdplus_staleness_max": v in (0, 1),
        "opdplus_divergence": 0 <= v < 50,
        "opdplus_clamped_frac": 0 <= v <= 1,
        "opdplus_is_truncated_frac": 0 <= v <= 1,
        "opdplus_weight_sync_seconds": 0 <= v < 120,
        "opdplus_loss": math.isfinite(v),
        "opdplus_restarts": v == 0,
        "opdplus_worker_samples_per_s": v >= 0,
        "opdplus_worker_samples": v >= 0,
        "opdplus_worker_restarts": v == 0,
    }
    return checks[name]


def _scrape_while_running(job: dict, wanted: list[str]) -> tuple[dict, str]:
    """Scrape the head's endpoint every few seconds until every wanted metric has a series for
    this run, or the job ends. Returns ({metric: [(labels, value)]}, last scrape text)."""
    cluster = job["cluster"]
    url = f"http://127.0.0.1:{cluster.metrics_port}/metrics"
    deadline = time.time() + 900
    found: dict = {n: [] for n in wanted}
    text = ""
    while time.time() < deadline:
        running = cluster.job_status(job["job_id"]) in ("PENDING", "RUNNING")
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        metrics = parse_prometheus(text)
        found = {
            n: [(lab, v) for lab, v in metrics.get(n, []) if lab.get("run") == job["name"]]
            for n in wanted
        }
        if all(found.values()) or not running:
            break
        time.sleep(4)
    return found, text


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.long
def test_metrics_of_a_running_job_reach_prometheus(request, cache_root, toy_pair, tmp_path):
    wanted = [f"ray_{n}" for n in [*STEP_GAUGES, *WORKER_GAUGES]]
    job = live_job(request.config, cache_root, need_running=True)
    found, text = _scrape_while_running(job, wanted)
    if not all(found.values()):
        # The shared job ended before every gauge was reported: watch a fresh one.
        job = live_job(request.config, cache_root, need_running=True)
        found, text = _scrape_while_running(job, wanted)
    url = f"http://127.0.0.1:{job['cluster'].metrics_port}/metrics"
    sample = "\n".join(ln for ln in text.splitlines() if "opdplus_" in ln)
    (tmp_path / "scrape.txt").write_text(sample + "\n")
    print(f"\nscrape of {url} ({tmp_path / 'scrape.txt'}):\n{sample}")
    missing = [n for n, series in found.items() if not series]
    assert not missing, f"not on {url}: {missing}"
    for n, series in found.items():
        for labels, v in series:
            assert _sane(n[len("ray_") :], v), (n, labels, v)
    samples = {lab["worker"]: v for lab, v in found["ray_opdplus_worker_samples"]}
    assert {"student-sampler-0", "teacher-scorer-0"} <= set(samples), samples
    assert samples["student-sampler-0"] > 0, samples


def test_step_row_maps_to_gauges(monkeypatch):
    """Which row key feeds which gauge, with which tags (a recording Gauge, no Ray needed)."""
    import ray.util.metrics

    import services.metrics
    from services.metrics import RayMetrics

    recorded: dict = {}

    class Recorder:
        def __init__(self, name, description="", tag_keys=()):
            self.name, self.tag_keys = name, tag_keys

        def set(self, value, tags=None):
            assert set(tags) == set(self.tag_keys), (self.name, tags)
            recorded[(self.name, tags.get("worker"))] = value

    monkeypatch.setattr(ray.util.metrics, "Gauge", Recorder)
    # A clock the test moves: the rate below is exact, whatever the machine's load.
    now = [1000.0]
    monkeypatch.setattr(services.metrics, "time", types.SimpleNamespace(time=lambda: now[0]))
    m = RayMetrics("r1")
    row = {
        "learner/loss": 0.5,
        "perf/samples_per_s": 12.0,
        "perf/tokens_per_s": 300.0,
        "rollout/channel_depth": 7,
        "rollout/staleness_mean": 0.5,
        "rollout/staleness_max": 1,
        "distill/divergence": 0.25,
        "distill/clamped_frac": 0.0,
        "distill/is_truncated_frac": 0.125,
        "time/sync": 0.03,
        "worker/student-sampler-0/samples": 16,
        "worker/student-sampler-0/restarts": 1,
        "worker/teacher-scorer-1/samples": 8,
        "worker/teacher-scorer-1/state": "ready",
    }
    m.step(3, row)
    assert recorded[("opdplus_step", None)] == 3
    assert recorded[("opdplus_channel_depth", None)] == 7
    assert recorded[("opdplus_is_truncated_frac", None)] == 0.125
    assert recorded[("opdplus_weight_sync_seconds", None)] == 0.03
    assert recorded[("opdplus_restarts", None)] == 1
    assert recorded[("opdplus_worker_samples", "teacher-scorer-1")] == 8
    assert recorded[("opdplus_worker_restarts", "student-sampler-0")] == 1
    # A rate needs two rows: none after the first.
    assert ("opdplus_worker_samples_per_s", "student-sampler-0") not in recorded
    # 16 more samples over the 2 s between the calls; the scorer's total did not move.
    now[0] += 2.0
    m.step(4, row | {"worker/student-sampler-0/samples": 32})
    assert recorded[("opdplus_worker_samples_per_s", "student-sampler-0")] == 8.0
    assert recorded[("opdplus_worker_samples_per_s", "teacher-scorer-1")] == 0.0
    assert recorded[("opdplus_worker_samples", "student-sampler-0")] == 32
    # A restarted worker whose total went down reports 0, never a negative rate.
    now[0] += 4.0
    m.step(5, row | {"worker/student-sampler-0/samples": 4})
    assert recorded[("opdplus_worker_samples_per_s", "student-sampler-0")] == 0.0
    now[0] += 1.0
    m.step(6, row | {"worker/student-sampler-0/samples": 10})
    assert recorded[("opdplus_worker_samples_per_s", "student-sampler-0")] == 6.0
