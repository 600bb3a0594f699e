"""The server's Prometheus metrics (`GET /metrics`, text format), kept by the `prometheus_client` library
in a registry of its own per app (no process-wide registry: two servers in one process count apart).

    jax_gpt2_requests_total{route, status}          HTTP answers, by route and status code
    jax_gpt2_prompt_tokens_total                    prompt tokens of accepted requests
    jax_gpt2_generated_tokens_total                 tokens generated (an end-of-text token not counted)
    jax_gpt2_queue_depth                            sequences waiting for their prefill to start
    jax_gpt2_active_sequences                       sequences being prefilled or decoded
    jax_gpt2_time_to_first_token_seconds            request arrival -> its first generated token
    jax_gpt2_inter_token_latency_seconds            gap between a sequence's tokens (an event of k
                                                    tokens after a gap g counts g / k, k times)
    jax_gpt2_draft_tokens_total                     serve --speculate lookup: draft tokens verified
    jax_gpt2_accepted_draft_tokens_total            ... of them the model accepted
    jax_gpt2_verify_passes_total                    decode passes that verified a draft (0 without --speculate)
"""

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

# Seconds: TTFT runs from a few ms (a cached prefix) to seconds (a long prompt behind others).
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)


class ServerMetrics:
    def __init__(self, engine) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("jax_gpt2_requests", "HTTP answers by route and status", ["route", "status"],
                                registry=self.registry)  # fmt: skip
        self.prompt_tokens = Counter("jax_gpt2_prompt_tokens", "Prompt tokens of accepted requests", registry=self.registry)
        self.generated_tokens = Counter("jax_gpt2_generated_tokens", "Tokens generated", registry=self.registry)
        queue_depth = Gauge("jax_gpt2_queue_depth", "Sequences waiting for their prefill", registry=self.registry)
        queue_depth.set_function(lambda: engine.num_queued)
        active = Gauge("jax_gpt2_active_sequences", "Sequences being prefilled or decoded", registry=self.registry)
        active.set_function(lambda: engine.num_active)
        self.ttft = Histogram("jax_gpt2_time_to_first_token_seconds", "Request arrival to its first token",
                              buckets=TTFT_BUCKETS, registry=self.registry)  # fmt: skip
        self.itl = Histogram("jax_gpt2_inter_token_latency_seconds", "Time between a sequence's tokens",
                             buckets=ITL_BUCKETS, registry=self.registry)  # fmt: skip
        self.registry.register(SpeculationCounters(engine))

    def clock(self, arrived: float) -> "SequenceClock":
        return SequenceClock(self, arrived)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class SequenceClock:
    """The token times of one request's sequences, observed into the histograms as events arrive."""

    def __init__(self, metrics: ServerMetrics, arrived: float) -> None:
        self.metrics, self.arrived = metrics, arrived
        self.last: dict[int, float] = {}  # seq_id -> when its latest tokens came

    def tokens(self, seq_id: int, count: int) -> None:
        assert count >= 0
        if count == 0:
            return
        now = time.perf_counter()
        self.metrics.generated_tokens.inc(count)
        if seq_id not in self.last:
            self.metrics.ttft.observe(now - self.arrived)
            count -= 1  # the first token's wait is the TTFT, not a gap
        for _ in range(count):
            self.metrics.itl.observe((now - self.last.get(seq_id, now)) / max(count, 1))
        self.last[seq_id] = now


class SpeculationCounters:
    """The engine's speculation counts, read when /metrics is scraped (the engine thread adds to them)."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def collect(self):
        engine = self.engine
        for name, documentation, value in (
            ("jax_gpt2_draft_tokens", "Draft tokens verified (serve --speculate)", engine.drafted_tokens),
            ("jax_gpt2_accepted_draft_tokens", "Draft tokens the model accepted", engine.accepted_tokens),
            ("jax_gpt2_verify_passes", "Decode passes that verified a draft", engine.verify_passes),
        ):  # fmt: skip
            assert value >= 0
            yield CounterMetricFamily(name, documentation, value=value)
