"""/metrics: the engine's gauges and the server's counters in Prometheus' text format."""
from __future__ import annotations

from lmstack.engine.serve.async_engine import TTFT_BUCKETS, AsyncEngine


def render_metrics(ae: AsyncEngine) -> str:
    """Prometheus text exposition format (version 0.0.4)."""
    s, m = ae.stats, ae.metrics
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, value: float, labels: str = "") -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        lines.append(f"{name}{labels} {value}")

    metric("lmstack_num_requests_running", "gauge", "Sequences currently scheduled (running).", s.num_running)
    metric("lmstack_num_requests_waiting", "gauge", "Sequences waiting to be scheduled.", s.num_waiting)
    metric("lmstack_kv_cache_usage_perc", "gauge", "Fraction of KV-cache blocks in use (0-1).", s.kv_cache_usage)
    metric("lmstack_kv_cache_blocks_used", "gauge", "KV-cache blocks in use.", s.kv_blocks_used)
    metric("lmstack_kv_cache_blocks_total", "gauge", "KV-cache blocks in the pool.", s.kv_blocks_total)
    metric("lmstack_prefix_cache_hit_rate", "gauge", "Fraction of looked-up prompt tokens served from the prefix "
           "cache.", s.prefix_cache_hit_rate)
    metric("lmstack_num_preemptions_total", "counter", "Sequences preempted for lack of KV blocks.", s.num_preemptions)
    metric("lmstack_prompt_tokens_total", "counter", "Prompt tokens computed (prefix-cache hits excluded).",
           s.num_prompt_tokens)
    metric("lmstack_generation_tokens_total", "counter", "Tokens generated.", s.num_generated_tokens)
    lines.append("# HELP lmstack_request_success_total Requests finished, by finish reason.")
    lines.append("# TYPE lmstack_request_success_total counter")
    for reason in sorted(set(m.finished) | {"stop", "length", "abort"}):
        lines.append(f'lmstack_request_success_total{{finished_reason="{reason}"}} {m.finished[reason]}')
    name = "lmstack_time_to_first_token_seconds"
    lines.append(f"# HELP {name} Time from request arrival to its first generated token.")
    lines.append(f"# TYPE {name} histogram")
    for b, c in zip(TTFT_BUCKETS, m.ttft_buckets):
        lines.append(f'{name}_bucket{{le="{b}"}} {c}')
    lines.append(f'{name}_bucket{{le="+Inf"}} {m.ttft_count}')
    lines.append(f"{name}_sum {m.ttft_sum}")
    lines.append(f"{name}_count {m.ttft_count}")
    return "\n".join(lines) + "\n"


