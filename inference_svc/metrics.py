"""Prometheus metrics every engine exports, named after vLLM's own where one exists."""

import prometheus_client

RUNNING = prometheus_client.Gauge(
    "chatterbot_engine_running_sequences", "Sequences being generated", ["model"]
)
WAITING = prometheus_client.Gauge(
    "chatterbot_engine_waiting_sequences", "Sequences waiting for a slot", ["model"]
)
TTFT = prometheus_client.Histogram(
    "chatterbot_engine_time_to_first_token_seconds",
    "From request arrival to its first token",
    ["model"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
ITL = prometheus_client.Histogram(
    "chatterbot_engine_inter_token_latency_seconds",
    "Between consecutive tokens of one sequence",
    ["model"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.5),
)
TOKENS = prometheus_client.Counter("chatterbot_engine_generated_tokens_total", "Tokens generated", ["model"])
PROMPT_TOKENS = prometheus_client.Counter(
    "chatterbot_engine_prompt_tokens_total", "Prompt tokens processed", ["model"]
)
ABORTS = prometheus_client.Counter(
    "chatterbot_engine_aborted_requests_total", "Requests aborted before the end", ["model"]
)
CACHE_HITS = prometheus_client.Counter(
    "chatterbot_result_cache_hits_total", "Deterministic requests answered from the result cache", ["model"]
)
CACHE_MISSES = prometheus_client.Counter(
    "chatterbot_result_cache_misses_total", "Deterministic requests the engine had to generate", ["model"]
)
REJECTED = prometheus_client.Counter(
    "chatterbot_engine_rejected_requests_total",
    "Requests refused because the waiting queue was full",
    ["model"],
)
