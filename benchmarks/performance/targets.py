"""The results' top-level figures and the performance targets, computed from what a run measured.

Concurrency 32 is the headline level. Four groups of figures, each from its own measurement:
`headline` from the load levels and the in-process ceiling, `ceiling_check` from the same (is the
ceiling above every server that serves the same model?), `cpu_per_image` from the py-spy profile,
`int8_figures` from the INT8 variant's levels, quantization report and in-process rows. A figure whose
measurement did not run is None, and so is the `met` of every target that needs it; a target against a
ceiling that a server beat is `met` None too, marked invalid.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from benchmarks.performance.profiling import DECODE, HTTP_PATH

HEADLINE_CONCURRENCY = 32

# Throughput, latency and memory targets.
TARGET_SERVICE_CEILING = 0.95
TARGET_SERVICE_NAIVE = 4.0
TARGET_P99_C1_SLACK_MS = 10.0
TARGET_RSS_GROWTH = 0.10
# CPU per image outside the model, and the INT8 variant.
TARGET_SERVICE_ORT_ALONE = 0.75
TARGET_DECODE_MS = 4.0
TARGET_HTTP_MS = 1.5
TARGET_INT8_FP32 = 1.3
TARGET_INT8_NAIVE = 4.0
# Against the BentoML peer (convserve / BentoML), and against one single-threaded batch per core set
# explicitly: the default must be as fast alone as the leanest server and as fast under load as the
# per-core configuration, without either's cost at the other end.
TARGET_PEER_C1_IMG = 1.1
TARGET_PEER_C1_P50 = 0.9
TARGET_PEER_C32_IMG = 1.4
TARGET_PEER_C32_P99 = 1.0
TARGET_SERVICE_PER_CORE = 1.0


def find_level(
    levels: Sequence[Mapping[str, Any]], server: str, mode: str, level: float
) -> Mapping[str, Any] | None:
    """The measured row for one server at one concurrency (mode "concurrency") or rate (mode "rate")."""
    for row in levels:
        if row["server"] == server and row["mode"] == mode and float(row["level"]) == float(level):
            return row
    return None


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 3)


def _throughput_at(levels: Sequence[Mapping[str, Any]], server: str, concurrency: int) -> float | None:
    row = find_level(levels, server, "concurrency", concurrency)
    return None if row is None else float(row["img_per_s"])


def headline(
    levels: Sequence[Mapping[str, Any]],
    ceiling_img_per_s: float | None,
    single_image_p99_ms: float | None,
    rss_mb_by_requests: Mapping[int, float],
    ort_alone_img_per_s: float | None = None,
) -> dict[str, Any]:
    """Throughputs, ratios, latencies and RSS of the FP32 servers (concurrency 32 is the headline)."""
    service = _throughput_at(levels, "service", HEADLINE_CONCURRENCY)
    naive = _throughput_at(levels, "naive", HEADLINE_CONCURRENCY)
    unbatched = _throughput_at(levels, "unbatched", HEADLINE_CONCURRENCY)
    instances = _throughput_at(levels, "instances", HEADLINE_CONCURRENCY)
    at_32 = find_level(levels, "service", "concurrency", HEADLINE_CONCURRENCY) or {}
    at_1 = find_level(levels, "service", "concurrency", 1) or {}
    checkpoints = sorted(rss_mb_by_requests)
    first_rss = rss_mb_by_requests[checkpoints[0]] if checkpoints else None
    last_rss = rss_mb_by_requests[checkpoints[-1]] if checkpoints else None
    growth = None
    if first_rss and last_rss is not None and len(checkpoints) > 1:
        growth = round(last_rss / first_rss - 1.0, 4)
    return {
        "ceiling_img_per_s": ceiling_img_per_s,
        "ort_alone_img_per_s": ort_alone_img_per_s,
        "service_img_per_s": service,
        "naive_img_per_s": naive,
        "unbatched_img_per_s": unbatched,
        "instances_img_per_s": instances,
        "ratio_service_ceiling": _ratio(service, ceiling_img_per_s),
        "ratio_service_ort_alone": _ratio(service, ort_alone_img_per_s),
        "ratio_service_naive": _ratio(service, naive),
        "ratio_service_unbatched": _ratio(service, unbatched),
        "ratio_instances_service": _ratio(instances, service),
        "p50_ms": at_32.get("p50_ms"),
        "p95_ms": at_32.get("p95_ms"),
        "p99_ms": at_32.get("p99_ms"),
        "p99_ms_at_concurrency_1": at_1.get("p99_ms"),
        "single_image_in_process_p99_ms": single_image_p99_ms,
        "rss_mb_after_1k": rss_mb_by_requests.get(1000),
        "rss_mb_after_20k": rss_mb_by_requests.get(20000),
        "rss_mb_by_requests": {str(count): rss_mb_by_requests[count] for count in checkpoints},
        "rss_growth": growth,
        "rss_growth_between_requests": [checkpoints[0], checkpoints[-1]] if len(checkpoints) > 1 else None,
    }


FP32_SERVERS = ("service", "unbatched", "instances")
"""The servers that run the very model the ceiling was measured with (not the naive one, not INT8)."""


def ceiling_check(levels: Sequence[Mapping[str, Any]], in_process: Mapping[str, Any]) -> dict[str, Any]:
    """Whether the in-process ceiling bounds every level of the FP32 servers, and its spread.

    The ceiling does strictly less work than any server (no HTTP, no queue), so a server level above it
    means the ceiling's windows were disturbed, not that the server is faster than the machine: every
    ratio to it is then meaningless, and the run says INVALID instead of reporting a target met.
    """
    ceiling = in_process.get("ceiling_img_per_s")
    spread = in_process.get("ceiling_spread")
    if ceiling is None:
        return {"ceiling_spread": spread, "ceiling_valid": None, "ceiling_invalid_reason": None}
    rows = [row for row in levels if row["server"] in FP32_SERVERS and row.get("img_per_s") is not None]
    fastest = max(rows, key=lambda row: float(row["img_per_s"]), default=None)
    if fastest is None or float(fastest["img_per_s"]) <= float(ceiling):
        return {"ceiling_spread": spread, "ceiling_valid": True, "ceiling_invalid_reason": None}
    where = "concurrency" if fastest["mode"] == "concurrency" else "offered rate"
    reason = (
        f"{fastest['server']} measured {float(fastest['img_per_s']):.1f} img/s at {where} "
        f"{fastest['level']:g}, above the in-process ceiling of {float(ceiling):.1f} img/s"
    )
    if spread and spread.get("relative_spread") is not None:
        reason += (
            f" (its windows: {spread['min_img_per_s']:.1f}–{spread['max_img_per_s']:.1f} img/s, "
            f"spread {spread['relative_spread']:.0%})"
        )
    return {"ceiling_spread": spread, "ceiling_valid": False, "ceiling_invalid_reason": reason}


def cpu_per_image(profile: Mapping[str, Any] | None) -> dict[str, Any]:
    """Decode and HTTP-path CPU ms per image from the profile's buckets (None without a profile).

    `http_ms_per_image` sums every bucket but ONNX Runtime's two and decode: the HTTP server,
    asyncio, multipart, JSON, Prometheus, batching and other Python (`http_ms_buckets` names them).
    """
    if not profile:
        return {"decode_ms_per_image": None, "http_ms_per_image": None, "http_ms_buckets": list(HTTP_PATH)}
    buckets = profile["buckets"]

    def ms(name: str) -> float:
        value = (buckets.get(name) or {}).get("cpu_ms_per_image")
        return float(value or 0.0)  # a bucket without samples is absent: it cost nothing

    return {
        "decode_ms_per_image": round(ms(DECODE), 2),
        "http_ms_per_image": round(sum(ms(name) for name in HTTP_PATH), 2),
        "http_ms_buckets": list(HTTP_PATH),
    }


def int8_figures(levels: Sequence[Mapping[str, Any]], int8: Mapping[str, Any] | None) -> dict[str, Any]:
    """The INT8 service against the FP32 service and the naive server, and what quantization cost."""
    served = _throughput_at(levels, "int8", HEADLINE_CONCURRENCY)
    comparison = ((int8 or {}).get("quantize") or {}).get("comparison") or {}
    in_process = (int8 or {}).get("in_process") or {}
    return {
        "int8_service_img_per_s": served,
        "ratio_int8_fp32": _ratio(served, _throughput_at(levels, "service", HEADLINE_CONCURRENCY)),
        "ratio_int8_naive": _ratio(served, _throughput_at(levels, "naive", HEADLINE_CONCURRENCY)),
        "int8_p99_ms": (find_level(levels, "int8", "concurrency", HEADLINE_CONCURRENCY) or {}).get("p99_ms"),
        "int8_top1_agreement": comparison.get("top1_agreement"),
        "int8_accuracy_drop": comparison.get("accuracy_drop"),
        "int8_ort_alone_img_per_s": in_process.get("int8_ort_alone_img_per_s"),
        "ratio_int8_fp32_ort_alone": _ratio(
            in_process.get("int8_ort_alone_img_per_s"), in_process.get("fp32_ort_alone_img_per_s")
        ),
        "int8_ceiling_img_per_s": in_process.get("int8_ceiling_img_per_s"),
    }


def _target(key: str, name: str, threshold: float | None, measured: Any, met: bool | None) -> dict[str, Any]:
    return {
        "key": key,
        "target": name,
        "threshold": threshold,
        "measured": measured,
        "met": met,
        "invalid": None,
    }


def _against_ceiling(target: dict[str, Any], results: Mapping[str, Any]) -> dict[str, Any]:
    """A target measured against the ceiling: neither met nor missed when the ceiling is invalid."""
    if results.get("ceiling_valid") is False:
        return {**target, "met": None, "invalid": results.get("ceiling_invalid_reason") or "invalid ceiling"}
    return target


def _at_least(key: str, name: str, value: float | None, threshold: float) -> dict[str, Any]:
    return _target(key, name, threshold, value, None if value is None else value >= threshold)


def _at_most(key: str, name: str, value: float | None, threshold: float | None) -> dict[str, Any]:
    met = None if value is None or threshold is None else value <= threshold
    return _target(key, name, threshold, value, met)


def check_targets(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each target: threshold, measured value, whether it was met (None: not measured, or measured
    against an invalid ceiling) and why it is invalid (None when it is not)."""
    p99_single = results.get("single_image_in_process_p99_ms")
    p99_limit = None if p99_single is None else round(p99_single + TARGET_P99_C1_SLACK_MS, 2)
    growth = results.get("rss_growth")
    growth_span = results.get("rss_growth_between_requests")
    growth_label = "RSS growth" + (f" {growth_span[0]} → {growth_span[1]} requests" if growth_span else "")
    c = HEADLINE_CONCURRENCY
    return [
        _against_ceiling(
            _at_least(
                "ratio_service_ceiling",
                f"service ≥ {TARGET_SERVICE_CEILING:.2f} × ceiling (c={c})",
                results.get("ratio_service_ceiling"),
                TARGET_SERVICE_CEILING,
            ),
            results,
        ),
        _at_least(
            "ratio_service_naive",
            f"service ≥ {TARGET_SERVICE_NAIVE:.0f} × naive (c={c})",
            results.get("ratio_service_naive"),
            TARGET_SERVICE_NAIVE,
        ),
        _at_most(
            "p99_ms_at_concurrency_1",
            f"p99 at c=1 ≤ in-process single-image p99 + {TARGET_P99_C1_SLACK_MS:.0f} ms",
            results.get("p99_ms_at_concurrency_1"),
            p99_limit,
        ),
        _target(
            "rss_growth",
            f"{growth_label} ≤ {TARGET_RSS_GROWTH:.0%}",
            TARGET_RSS_GROWTH,
            growth,
            None if growth is None else abs(growth) <= TARGET_RSS_GROWTH,
        ),
        _at_least(
            "ratio_service_ort_alone",
            f"service ≥ {TARGET_SERVICE_ORT_ALONE:.2f} × ONNX Runtime alone (c={c})",
            results.get("ratio_service_ort_alone"),
            TARGET_SERVICE_ORT_ALONE,
        ),
        _at_most(
            "decode_ms_per_image",
            f"decode + preprocess ≤ {TARGET_DECODE_MS:.0f} CPU ms per image (c={c})",
            results.get("decode_ms_per_image"),
            TARGET_DECODE_MS,
        ),
        _at_most(
            "http_ms_per_image",
            f"HTTP + framework + JSON ≤ {TARGET_HTTP_MS} CPU ms per image (c={c})",
            results.get("http_ms_per_image"),
            TARGET_HTTP_MS,
        ),
        _at_least(
            "ratio_int8_fp32",
            f"INT8 service ≥ {TARGET_INT8_FP32} × FP32 service (c={c})",
            results.get("ratio_int8_fp32"),
            TARGET_INT8_FP32,
        ),
        _at_least(
            "ratio_int8_naive",
            f"INT8 service ≥ {TARGET_INT8_NAIVE:.0f} × naive (c={c})",
            results.get("ratio_int8_naive"),
            TARGET_INT8_NAIVE,
        ),
        *_peer_targets(results),
    ]


def _peer_targets(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The service against the BentoML peer at 1 and 32 clients, and against one batch per core."""
    ratios = results.get("peer_ratios") or {}
    alone, loaded = ratios.get("service/bento@c1", {}), ratios.get("service/bento@c32", {})
    c = HEADLINE_CONCURRENCY
    per_core_ratio = ratios.get(f"service/instances@c{c}", {}).get("img_per_s")  # interleaved rounds
    service = find_level(results.get("levels", []), "service", "concurrency", c)
    per_core = find_level(results.get("levels", []), "instances", "concurrency", c)
    if per_core_ratio is None and service and per_core and per_core["img_per_s"]:  # runs without rounds
        per_core_ratio = round(service["img_per_s"] / per_core["img_per_s"], 3)
    return [
        _at_least(
            "peer_c1_img_per_s",
            f"img/s ≥ {TARGET_PEER_C1_IMG} × BentoML (c=1)",
            alone.get("img_per_s"),
            TARGET_PEER_C1_IMG,
        ),
        _at_most(
            "peer_c1_p50_ms",
            f"p50 ≤ {TARGET_PEER_C1_P50} × BentoML's (c=1)",
            alone.get("p50_ms"),
            TARGET_PEER_C1_P50,
        ),
        _at_least(
            "peer_c32_img_per_s",
            f"img/s ≥ {TARGET_PEER_C32_IMG} × BentoML (c={c})",
            loaded.get("img_per_s"),
            TARGET_PEER_C32_IMG,
        ),
        _at_most(
            "peer_c32_p99_ms",
            f"p99 ≤ {TARGET_PEER_C32_P99} × BentoML's (c={c})",
            loaded.get("p99_ms"),
            TARGET_PEER_C32_P99,
        ),
        _at_least(
            "ratio_service_per_core",
            f"img/s ≥ {TARGET_SERVICE_PER_CORE} × one batch per core set explicitly (c={c})",
            per_core_ratio,
            TARGET_SERVICE_PER_CORE,
        ),
    ]
