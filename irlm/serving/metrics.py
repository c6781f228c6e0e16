"""Prometheus metrics at ``/metrics``, named like vLLM's so existing dashboards map over.

Request-level series (TTFT, inter-token latency, end-to-end latency, token counters, outcomes)
are measured in the server process where the client sees them; the scheduler's gauges
(running / waiting, KV-cache usage, prefix-cache counters, iteration latency) come from the
engine core with every step.  Each server has its own registry, so several can live in one
process (tests) without clashing.
"""
from __future__ import annotations

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest)

__all__ = ["ServingMetrics", "CONTENT_TYPE_LATEST", "FINISH_REASONS"]

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
                0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                60.0, 120.0, 240.0, 480.0, 960.0)
FINISH_REASONS = ("stop", "length", "abort")


class ServingMetrics:
    def __init__(self, model_name: str):
        self.registry = r = CollectorRegistry()
        lab = ["model_name"]
        self.model_name = model_name

        def g(name, doc):
            return Gauge(name, doc, lab, registry=r).labels(model_name)

        def c(name, doc):
            return Counter(name, doc, lab, registry=r).labels(model_name)

        def h(name, doc, buckets):
            return Histogram(name, doc, lab, buckets=buckets, registry=r).labels(model_name)

        self.running = g("vllm:num_requests_running", "Requests the engine is running.")
        self.waiting = g("vllm:num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = g("vllm:kv_cache_usage_perc",
                          "Fraction of KV-cache blocks in use (1 = full).")
        self.gpu_kv_usage = g("vllm:gpu_cache_usage_perc",
                              "Fraction of KV-cache blocks in use (older vLLM name).")
        self.kv_free_blocks = g("irlm:kv_cache_free_blocks", "KV-cache blocks no request holds.")
        self.kv_blocks = g("irlm:kv_cache_blocks", "KV-cache blocks in all.")
        self.prefix_queries = c("vllm:prefix_cache_queries",
                                "Prompt blocks looked up in the prefix cache.")
        self.prefix_hits = c("vllm:prefix_cache_hits", "Prompt blocks found in the prefix cache.")
        self.preemptions = c("vllm:num_preemptions", "Requests preempted (recomputed later).")
        self.prompt_tokens = c("vllm:prompt_tokens", "Prompt tokens of admitted requests.")
        self.generation_tokens = c("vllm:generation_tokens", "Tokens generated.")
        self.ttft = h("vllm:time_to_first_token_seconds",
                      "Arrival to first generated token.", _LATENCY_BUCKETS)
        self.itl = h("vllm:inter_token_latency_seconds",
                     "Time between consecutive tokens of a stream.", _ITL_BUCKETS)
        self.tpot = h("vllm:time_per_output_token_seconds",
                      "Mean time per output token after the first, per request.", _ITL_BUCKETS)
        self.e2e = h("vllm:e2e_request_latency_seconds", "Arrival to last token.", _E2E_BUCKETS)
        self.queue_time = h("vllm:request_queue_time_seconds",
                            "Arrival in the engine to first scheduling.", _LATENCY_BUCKETS)
        self.iteration = h("irlm:iteration_latency_seconds",
                           "Duration of one engine step (the whole in-flight batch).",
                           _ITL_BUCKETS)
        self.iteration_tokens = Histogram(
            "vllm:iteration_tokens_total", "Tokens generated per engine step.", lab,
            buckets=(1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096), registry=r
        ).labels(model_name)
        success = Counter("vllm:request_success", "Finished requests by finish reason.",
                          lab + ["finished_reason"], registry=r)
        self.success = {k: success.labels(model_name, k) for k in FINISH_REASONS}
        self.rejected = Counter("irlm:request_rejected", "Requests refused, by reason.",
                                lab + ["reason"], registry=r)
        self._prefix = (0, 0, 0)

    def on_core_stats(self, s) -> None:
        self.running.set(s.num_running)
        self.waiting.set(s.num_waiting)
        used = (s.num_blocks - s.num_free_blocks) / s.num_blocks if s.num_blocks else 0.0
        self.kv_usage.set(used)
        self.gpu_kv_usage.set(used)
        self.kv_free_blocks.set(s.num_free_blocks)
        self.kv_blocks.set(s.num_blocks)
        q, hits, pre = self._prefix
        self.prefix_queries.inc(max(0, s.prefix_queries - q))
        self.prefix_hits.inc(max(0, s.prefix_hits - hits))
        self.preemptions.inc(max(0, s.num_preemptions - pre))
        self._prefix = (s.prefix_queries, s.prefix_hits, s.num_preemptions)
        if s.step_seconds is not None:
            self.iteration.observe(s.step_seconds)
            self.iteration_tokens.observe(s.step_new_tokens)

    def reject(self, reason: str) -> None:
        self.rejected.labels(self.model_name, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
