"""Prometheus metrics. One registry per app, so several apps (tests) never collide."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160)


def strength_bucket(strength: float) -> str:
    """Coarse label so the series count stays bounded whatever strengths clients send."""
    if strength == 0:
        return "0"
    for edge in (0.5, 1.0, 1.5, 2.0, 3.0):
        if strength <= edge:
            return f"<={edge:g}"
    return ">3"


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        # endpoint: the route's path template, "other" for every unmatched path (bounded series)
        self.requests = Counter(
            "steer_requests", "HTTP requests by route and status", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter("steer_prompt_tokens", "Prompt tokens processed", registry=r)
        self.completion_tokens = Counter("steer_completion_tokens", "Completion tokens generated", registry=r)
        self.latency = Histogram(
            "steer_request_latency_seconds", "End-to-end request latency", ["endpoint"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.ttft = Histogram(
            "steer_time_to_first_token_seconds", "Time to first token", ["endpoint"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.steered = Counter(
            "steer_steered_requests", "Requests by vector and strength bucket", ["vector", "strength"], registry=r
        )
        self.compare = Counter("steer_compare_requests", "Requests that asked for the baseline", registry=r)
        self.gate_fired = Counter(
            "steer_gate", "Steered rows by gate decision", ["vector", "fired"], registry=r
        )
        self.gate_pass = Counter(
            "steer_gate_pass", "vLLM backend: gate passes run as the whole row, by outcome (kept: the gate closed "
            "and the pass was the row; rerun: it opened and the row ran again with its adapter)", ["outcome"],
            registry=r,
        )
        self.batch_size = Gauge("steer_batch_size", "Rows in the running batch", registry=r)
        self.running_rows = Gauge("steer_running_rows", "Rows being prefilled or decoded now", registry=r)
        self.queued_requests = Gauge(
            "steer_queued_requests", "Requests accepted and waiting for a batch slot", registry=r
        )
        self.step_seconds = Histogram(
            "steer_engine_step_seconds", "Engine step time", buckets=(0.01, 0.03, 0.1, 0.3, 1, 3, 10), registry=r
        )

    def observe_step(self, rows: int, seconds: float) -> None:
        self.batch_size.set(rows)
        self.step_seconds.observe(seconds)

    def gate(self, value: tuple[str, str] | None) -> None:
        """Count a decided gate: (vector, "open" | "closed" | "lowered"); ``fired`` is "true" for open,
        "false" for closed, "lowered" where a two-sided gate lowered refusal."""
        if value is not None:
            fired = {"open": "true", "closed": "false"}.get(value[1], value[1])
            self.gate_fired.labels(value[0], fired).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
