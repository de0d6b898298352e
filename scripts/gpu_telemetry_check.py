"""Run Molten's NVML telemetry path on a real NVIDIA GPU and print what it read.

Usage, on a machine with an NVIDIA driver and the project installed:

    .venv/bin/python scripts/gpu_telemetry_check.py --seconds 10 --output gpu_check.json

The script samples every visible GPU through `molten.telemetry.TelemetrySampler` (the
code the `molten:telemetry` actor runs) while a matrix-product load runs on GPU 0 for
the middle third of the run, so utilization, clocks, power and memory should visibly
rise and fall. It then measures the roofline peaks on GPU 0 and writes everything as
JSON. It exits with status 1 when NVML does not start (the reason is printed), and with
status 2 when a field was unreadable on every sample. Record the printed summary, the
date and the GPU in docs/metrics.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import threading
import time
from datetime import datetime, timezone

from molten.telemetry import TelemetryConfig, TelemetrySampler, resolve_peaks
from molten.telemetry.nvml import GPU_FIELDS

MAX_SECONDS = 120.0
LOAD_MATRIX_SIZE = 8192


def run_load(stop: threading.Event, deadline: float) -> int:
    """Multiply two matrices on GPU 0 until `stop` is set or `deadline` passes; return the product count."""
    import torch

    a = torch.randn(LOAD_MATRIX_SIZE, LOAD_MATRIX_SIZE, device="cuda", dtype=torch.float16)
    b = torch.randn(LOAD_MATRIX_SIZE, LOAD_MATRIX_SIZE, device="cuda", dtype=torch.float16)
    count = 0
    while not stop.is_set() and time.monotonic() < deadline:
        torch.mm(a, b)
        torch.cuda.synchronize()
        count += 1
    return count


def summarize(samples: list[dict]) -> dict:
    """Per GPU and field: first, min and max value over the samples, and the errors seen."""
    summary: dict[int, dict] = {}
    for sample in samples:
        for gpu in sample["gpus"]:
            entry = summary.setdefault(gpu["index"], {"name": gpu["name"], "fields": {}, "errors": {}})
            for field in GPU_FIELDS:
                value = gpu[field]
                if field in ("name", "processes") or value is None:
                    continue
                stats = entry["fields"].setdefault(field, {"first": value, "min": value, "max": value})
                stats["min"] = min(stats["min"], value)
                stats["max"] = max(stats["max"], value)
            for field, message in gpu["errors"].items():
                entry["errors"].setdefault(field, set()).add(message)
            entry["max_processes"] = max(entry.get("max_processes", 0), len(gpu["processes"] or []))
    for entry in summary.values():
        entry["errors"] = {field: sorted(messages) for field, messages in entry["errors"].items()}
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="sampling time in seconds (at most 120)")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between samples")
    parser.add_argument("--output", default=None, help="JSON file to write the samples and summary to")
    parser.add_argument("--no-peaks", action="store_true", help="skip the roofline peak measurement")
    args = parser.parse_args()
    seconds = min(args.seconds, MAX_SECONDS)

    config = TelemetryConfig(interval_s=args.interval, history_samples=int(seconds / args.interval) + 10)
    sampler = TelemetrySampler(config)
    if sampler.source != "nvml":
        print(f"NVML did not start: {sampler.notice}", file=sys.stderr)
        return 1

    stop_load = threading.Event()
    load_result: dict = {}
    started = time.monotonic()

    def load_thread() -> None:
        time.sleep(seconds / 3)
        load_result["products"] = run_load(stop_load, started + 2 * seconds / 3)

    loader = threading.Thread(target=load_thread, daemon=True)
    loader.start()
    sampler.start()
    time.sleep(seconds)
    stop_load.set()
    sampler.stop()
    loader.join(timeout=30)

    snapshot = sampler.snapshot()
    summary = summarize(snapshot["samples"])
    peaks = None if args.no_peaks else resolve_peaks(TelemetryConfig(peak_dtype="float16"), "cuda").to_dict()
    report = {
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "num_samples": len(snapshot["samples"]),
        "num_failed_samples": snapshot["num_failed_samples"],
        "load_products": load_result.get("products"),
        "summary": summary,
        "peaks": peaks,
        "samples": snapshot["samples"],
    }
    print(json.dumps({key: value for key, value in report.items() if key != "samples"}, indent=2, default=str))
    if args.output:
        with open(args.output, "w") as output:
            json.dump(report, output, indent=2, default=str)

    always_missing = [
        (index, field)
        for index, entry in summary.items()
        for field in GPU_FIELDS
        if field not in ("name", "processes") and field not in entry["fields"]
    ]
    if always_missing:
        print(f"fields unreadable on every sample (GPU index, field): {always_missing}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
