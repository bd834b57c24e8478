"""OpenTelemetry spans and metrics (the ``[otel]`` extra), through the SDK's in-memory exporters, for a refresh,
a failure and a 401 replay over real HTTP against the LocalProvider."""

from __future__ import annotations

import gc
import subprocess
import sys
import weakref
from typing import Any

import attrs
import pytest
from support import SESSION, Driver, ManagerFactory, expired, fail_refresh, put_entry, wait_until

from httpx_upstream_auth import MemoryStorage, OAuth2Refresher, RefreshFailed, TokenManager
from httpx_upstream_auth._otel import MAX_RETIRED_PROVIDERS
from httpx_upstream_auth.testing import LocalProvider

pytest.importorskip("opentelemetry.sdk", reason="the dev extra installs opentelemetry-sdk")

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

pytestmark = pytest.mark.anyio

# The global providers can be set once per process: every test here shares them and reads what it added.
SPANS = InMemorySpanExporter()
READER = InMemoryMetricReader()
_tracing = TracerProvider()
_tracing.add_span_processor(SimpleSpanProcessor(SPANS))
trace.set_tracer_provider(_tracing)
metrics.set_meter_provider(MeterProvider(metric_readers=[READER]))


def points(name: str) -> dict[tuple[tuple[str, Any], ...], Any]:
    """The current data points of the instrument ``name``, by their attributes (sums, or histogram counts)."""
    found: dict[tuple[tuple[str, Any], ...], Any] = {}
    data = READER.get_metrics_data()
    for resource in data.resource_metrics if data is not None else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    for point in metric.data.data_points:
                        labels = tuple(sorted((point.attributes or {}).items()))
                        found[labels] = getattr(point, "value", None) if hasattr(point, "value") else point.count
    return found


def refresh_spans() -> list[Any]:
    """The refresh spans finished since the last ``SPANS.clear()``."""
    return [span for span in SPANS.get_finished_spans() if span.name == "httpx_upstream_auth.refresh"]


def delta(before: dict[Any, Any], after: dict[Any, Any]) -> dict[Any, Any]:
    """What changed between two :func:`points` readings."""
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def label(outcome: str, reason: str) -> tuple[tuple[str, Any], ...]:
    """The attributes of a refresh's data point."""
    return (("httpx_upstream_auth.provider_id", "local"), ("outcome", outcome), ("reason", reason))


async def test_refresh_span_and_metrics(driver: Driver, provider: LocalProvider, make_manager: ManagerFactory) -> None:
    """An expired token's refresh: one span (status unset), the refresh counter and the duration histogram
    each gain one point for success/expired."""
    manager = make_manager()
    put_entry(manager, expired(provider.login()))
    SPANS.clear()
    counts, durations = points("httpx_upstream_auth.refreshes"), points("httpx_upstream_auth.refresh.duration")
    assert (await driver.request(manager)).status_code == 200
    await wait_until(lambda: len(refresh_spans()) == 1)  # the job records after publishing its outcome
    spans = refresh_spans()
    assert len(spans) == 1
    span = spans[0]
    assert span.attributes is not None and span.attributes["outcome"] == "success"
    assert span.attributes["reason"] == "expired" and span.status.status_code == trace.StatusCode.UNSET
    assert span.end_time is not None and span.start_time is not None and span.end_time >= span.start_time
    assert delta(counts, points("httpx_upstream_auth.refreshes")) == {label("success", "expired"): 1}
    assert delta(durations, points("httpx_upstream_auth.refresh.duration")) == {label("success", "expired"): 1}
    assert provider.stats["refresh_ok"] == 1


async def test_failed_refresh_span_and_metrics(
    driver: Driver, provider: LocalProvider, make_manager: ManagerFactory
) -> None:
    """A refresh the provider refuses on every attempt (503): an ERROR span naming the error's class, and one
    failure in the counter."""
    manager = make_manager()
    put_entry(manager, expired(provider.login()))
    fail_refresh(provider, "503")
    SPANS.clear()
    counts = points("httpx_upstream_auth.refreshes")
    with pytest.raises(RefreshFailed):
        await driver.get_token(manager, SESSION)
    await wait_until(lambda: len(refresh_spans()) == 1)
    spans = refresh_spans()
    assert len(spans) == 1 and spans[0].status.status_code == trace.StatusCode.ERROR
    assert spans[0].status.description == "RefreshFailed"
    assert delta(counts, points("httpx_upstream_auth.refreshes")) == {label("failure", "expired"): 1}


async def test_replay_is_counted(driver: Driver, provider: LocalProvider, make_manager: ManagerFactory) -> None:
    """A 401 replayed with a refreshed token: one replay, one refresh for reason rejected."""
    manager = make_manager()
    first = await driver.store(manager, provider.login())
    provider.revoke_access(first.access_token)
    SPANS.clear()
    replays, counts = points("httpx_upstream_auth.replays"), points("httpx_upstream_auth.refreshes")
    assert (await driver.request(manager)).status_code == 200
    await wait_until(lambda: len(refresh_spans()) == 1)
    assert delta(replays, points("httpx_upstream_auth.replays")) == {(("httpx_upstream_auth.provider_id", "local"),): 1}
    assert delta(counts, points("httpx_upstream_auth.refreshes")) == {label("success", "rejected"): 1}


def lookups(provider_id: str) -> dict[str, int]:
    """The cache-lookup counter's current values for ``provider_id``, by result."""
    found = points("httpx_upstream_auth.cache.lookups")
    return {dict(k)["result"]: v for k, v in found.items() if dict(k)["httpx_upstream_auth.provider_id"] == provider_id}


async def test_cache_lookups_are_counted_and_outlive_their_manager(provider: LocalProvider, token_url: str) -> None:
    """Three requests on a valid token: the first misses the cache (it reads the store), the other two hit it.
    A second manager of the same provider id adds to the same counter, and once both are collected their counts
    stay (the counter never goes down)."""
    storage = MemoryStorage()
    refresher = OAuth2Refresher(token_url, "test-client", "test-secret")

    def make() -> TokenManager:
        return TokenManager(refresher=refresher, provider_id="lookups-test", storage=storage)

    def since(before: dict[str, int]) -> dict[str, int]:
        now = lookups("lookups-test")
        return {result: now.get(result, 0) - before.get(result, 0) for result in ("hit", "miss")}

    manager = make()
    await manager.astore(SESSION, attrs.evolve(provider.login(), provider_id="lookups-test"))
    await manager.aclose()  # the login cached the entry: a fresh manager starts with an empty cache
    before = lookups("lookups-test")
    first = make()
    for _ in range(3):
        await first.aget_token(SESSION)
    assert since(before) == {"hit": 2, "miss": 1}
    second = make()
    for _ in range(2):
        await second.aget_token(SESSION)
    assert since(before) == {"hit": 3, "miss": 2}
    await first.aclose()
    await second.aclose()
    gone = [weakref.ref(first), weakref.ref(second)]
    del manager, first, second
    gc.collect()
    assert [ref() for ref in gone] == [None, None]
    assert since(before) == {"hit": 3, "miss": 2}


def test_managers_of_ever_new_provider_ids_keep_the_metric_bounded(token_url: str) -> None:
    """A manager per tenant, each with its own provider id, made and dropped: once 500 ids have their series,
    the managers of further ones count under "(other)", so the series stay bounded (within the SDK's own
    limit, which would otherwise fold them into its overflow series), and no series ever goes down. In a child
    process: the meter and its series are the process's, and these would crowd out the other tests'."""
    program = f"""
import gc
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
reader = InMemoryMetricReader()
metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
from httpx_upstream_auth import MemoryStorage, OAuth2Refresher, TokenManager
refresher = OAuth2Refresher({token_url!r}, "test-client", "test-secret")
kept = TokenManager(refresher=refresher, provider_id="tenant-0", storage=MemoryStorage())
for i in range(1, {MAX_RETIRED_PROVIDERS} + 50):
    TokenManager(refresher=refresher, provider_id=f"tenant-{{i}}", storage=MemoryStorage()).close()
late = TokenManager(refresher=refresher, provider_id="tenant-0", storage=MemoryStorage())
gc.collect()
ids = set()
for resource in reader.get_metrics_data().resource_metrics:
    for scope in resource.scope_metrics:
        for metric in scope.metrics:
            if metric.name == "httpx_upstream_auth.cache.lookups":
                for point in metric.data.data_points:
                    ids.add(dict(point.attributes).get("httpx_upstream_auth.provider_id"))
print(len(ids), "(other)" in ids, "tenant-0" in ids, None in ids)
"""
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(MAX_RETIRED_PROVIDERS + 1), "True", "True", "False"]
