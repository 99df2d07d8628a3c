"""The soak run's numbers: per-window latency percentiles, memory and KV samples, the
summary it prints, and the JSON + PNG it writes (see tests/soak/soak.py)."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass
class Record:
    """One finished request."""

    t_done: float  # seconds since the load started
    latency_s: float
    kind: str
    error: str | None


@dataclass
class Sample:
    """The server process and engine, sampled every few seconds."""

    t: float
    rss_mib: float
    kv_usage: float
    kv_free_blocks: float
    running: float
    waiting: float
    preemptions: float


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def windows(records: list[Record], window_s: float, duration_s: float) -> list[dict[str, Any]]:
    """Requests, errors and latency percentiles per window of completion time."""
    count = max(1, math.ceil(duration_s / window_s - 1e-9))
    out = []
    for w in range(count):
        inside = [r for r in records if w * window_s <= r.t_done < (w + 1) * window_s]
        if w == count - 1:  # requests in flight at the deadline finish a little after it
            inside += [r for r in records if r.t_done >= count * window_s]
        ok = [r.latency_s for r in inside if r.error is None]
        out.append(
            {
                "window": w,
                "start_s": w * window_s,
                "requests": len(inside),
                "errors": sum(r.error is not None for r in inside),
                "p50_s": percentile(ok, 50),
                "p90_s": percentile(ok, 90),
                "p99_s": percentile(ok, 99),
            }
        )
    return out


def memory_summary(samples: list[Sample], warmup_s: float) -> dict[str, float]:
    """RSS at the start, after the warm-up, at the end and at most; growth after warm-up."""
    if not samples:
        return {}
    warm = [s for s in samples if s.t >= warmup_s] or samples[-1:]
    return {
        "rss_first_mib": samples[0].rss_mib,
        "rss_after_warmup_mib": warm[0].rss_mib,
        "rss_last_mib": samples[-1].rss_mib,
        "rss_max_mib": max(s.rss_mib for s in samples),
        "rss_growth_after_warmup_mib": samples[-1].rss_mib - warm[0].rss_mib,
        "kv_usage_mean": sum(s.kv_usage for s in samples) / len(samples),
        "kv_usage_max": max(s.kv_usage for s in samples),
    }


def build_report(
    config: dict[str, Any],
    records: list[Record],
    samples: list[Sample],
    final: dict[str, Any],
    duration_s: float,
) -> dict[str, Any]:
    ok = [r.latency_s for r in records if r.error is None]
    errors = Counter(f"{r.kind}: {(r.error or '')[:160]}" for r in records if r.error)
    kinds = sorted({r.kind for r in records})
    per_kind = {
        k: {
            "requests": sum(r.kind == k for r in records),
            "errors": sum(r.kind == k and r.error is not None for r in records),
            "p50_s": percentile([r.latency_s for r in records if r.kind == k and not r.error], 50),
            "p99_s": percentile([r.latency_s for r in records if r.kind == k and not r.error], 99),
        }
        for k in kinds
    }
    return {
        "config": config,
        "duration_s": duration_s,
        "totals": {
            "requests": len(records),
            "errors": sum(r.error is not None for r in records),
            "requests_per_s": len(records) / duration_s if duration_s else math.nan,
            "p50_s": percentile(ok, 50),
            "p90_s": percentile(ok, 90),
            "p99_s": percentile(ok, 99),
        },
        "windows": windows(records, config["window_seconds"], duration_s),
        "memory": memory_summary(samples, config["window_seconds"]),
        "final": final,
        "errors": dict(errors.most_common(20)),
        "per_kind": per_kind,
        "samples": [asdict(s) for s in samples],
    }


def summary_text(report: dict[str, Any]) -> str:
    t, m, f = report["totals"], report["memory"], report["final"]
    lines = [
        f"soak: {t['requests']} requests in {report['duration_s']:.0f} s "
        f"({t['requests_per_s']:.1f}/s) at concurrency {report['config']['concurrency']}, "
        f"{t['errors']} errors",
        f"latency p50 {t['p50_s']:.3f} s  p90 {t['p90_s']:.3f} s  p99 {t['p99_s']:.3f} s",
        "window  requests  errors   p50 s   p90 s   p99 s",
    ]
    for w in report["windows"]:
        lines.append(
            f"{w['window']:>6}  {w['requests']:>8}  {w['errors']:>6}  {w['p50_s']:6.3f}  "
            f"{w['p90_s']:6.3f}  {w['p99_s']:6.3f}"
        )
    if m:
        lines.append(
            f"server RSS {m['rss_first_mib']:.0f} MiB at start, {m['rss_after_warmup_mib']:.0f} "
            f"after warm-up, {m['rss_last_mib']:.0f} at the end (max {m['rss_max_mib']:.0f}; "
            f"growth after warm-up {m['rss_growth_after_warmup_mib']:+.1f} MiB)"
        )
        lines.append(f"KV usage mean {m['kv_usage_mean']:.1%}, max {m['kv_usage_max']:.1%}")
    lines.append(
        f"after the load: KV free {f.get('kv_free_blocks')} / {f.get('kv_total_blocks')} blocks, "
        f"{f.get('preemptions')} preemptions, server exit status {f.get('exit_status')}"
    )
    for message, count in list(report["errors"].items())[:5]:
        lines.append(f"  {count} x {message}")
    return "\n".join(lines)


def write_outputs(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out_dir / "soak.json", out_dir / "soak.png"
    json_path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    plot(report, png_path)
    return json_path, png_path


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window_min = report["config"]["window_seconds"] / 60
    fig, (lat, mem, kv) = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    ws = report["windows"]
    x = [(w["window"] + 0.5) * window_min for w in ws]
    for key, label in (("p50_s", "p50"), ("p90_s", "p90"), ("p99_s", "p99")):
        lat.plot(x, [w[key] for w in ws], marker="o", label=label)
    errors = [w["errors"] for w in ws]
    lat.set_ylabel("request latency (s)")
    lat.set_title(
        f"soak: {report['totals']['requests']} requests, {sum(errors)} errors, "
        f"concurrency {report['config']['concurrency']}"
    )
    lat.legend()
    samples = report["samples"]
    ts = [s["t"] / 60 for s in samples]
    mem.plot(ts, [s["rss_mib"] for s in samples], color="tab:purple")
    mem.set_ylabel("server RSS (MiB)")
    kv.plot(ts, [100 * s["kv_usage"] for s in samples], color="tab:green", label="KV used %")
    kv.plot(ts, [s["running"] for s in samples], color="tab:orange", label="running requests")
    kv.set_ylabel("KV used % / running")
    kv.set_xlabel("minutes since the load started")
    kv.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
