"""The metric definitions, worded exactly as metrics.py computes them; shown in the HTML report and the docs."""

from __future__ import annotations

DEFINITIONS: tuple[tuple[str, str], ...] = (
    ("TTFT", "time from sending the request to the arrival of the first SSE chunk that carries text."),
    (
        "TPOT",
        "(E2E latency − TTFT) / (output tokens − 1), per request (vLLM's definition); requests with fewer than "
        "2 output tokens have no TPOT. genai-perf and TGI average per-token gaps instead, which weights "
        "multi-token chunks differently.",
    ),
    (
        "ITL",
        "gaps between successive text-carrying chunks of a request, pooled over all requests (a chunk that "
        "carries several tokens counts as one gap).",
    ),
    ("E2E latency", "time from sending the request to the end of its response stream ([DONE])."),
    (
        "Output tokens",
        "the server's usage.completion_tokens (stream_options.include_usage), else the chunk count.",
    ),
    (
        "Duration",
        "from the first measured request's start to the last one's end; warmup requests are excluded.",
    ),
    ("Request throughput", "completed requests / duration."),
    ("Output token throughput", "sum of output tokens of completed requests / duration."),
    ("Total token throughput", "(prompt tokens + output tokens) of completed requests / duration."),
    (
        "Goodput",
        "completed requests whose TTFT, TPOT and E2E are all within the --slo limits, / duration "
        "(a one-token answer has no TPOT and passes that limit).",
    ),
    ("Percentiles", "numpy linear interpolation between closest ranks (p50 = median)."),
    ("Peak concurrency", "most requests in flight at one instant."),
    (
        "Errors",
        "http_<status>, timeout (the --timeout whole-request limit), disconnect (connection closed or reset "
        "mid-request), connect (refused), protocol (bad SSE/JSON or no [DONE]), stream_error (error object "
        "in the stream).",
    ),
)
