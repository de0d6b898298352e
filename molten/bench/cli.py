"""`molten bench`: argument parsing and the entry point.

This module imports only the standard library at import time, so `molten --help`
stays fast; `main` imports the benchmark code when it runs.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from molten.bench.choices import DOOR_NAMES, DTYPE_NAMES, PEER_NAMES, QUANTIZED_NAMES, WORKLOAD_NAMES

DESCRIPTION = """\
Measure Molten and its peers side by side on this machine and write the results page.

Workloads: single (one stream, 128-token prompt, 128 new tokens), concurrent (32
requests with prompts of 32-1024 tokens arriving together and by Poisson arrivals,
plus a batch-size sweep), shared-prefix (32 requests sharing a 512-token system
prompt, prefix caching on and off), long-context (TTFT and ITL from 256 tokens up to
max_model_len, and long prompts arriving while 8 streams decode, chunked prefill on
and off), disagg (the concurrent workload served disaggregated and co-located).
Peers: transformers generate() one at a time and in static batches, and llama.cpp
on the same GGUF file when llama-cpp-python is installed.

The full run takes a long time on a small CPU (an hour or more on 2 cores, mostly
the transformers peers and the long-context sweep up to 8192 tokens); --quick
shrinks every workload so the whole run takes minutes. Ray Serve is started on
127.0.0.1 only for the handle and http doors and the disagg workload.
"""


def _names(allowed: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown name(s) {', '.join(unknown)}; choose from {', '.join(allowed)}")
        return names

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the `molten bench` options on `parser`."""
    parser.description = DESCRIPTION
    parser.formatter_class = argparse.RawDescriptionHelpFormatter

    parser.add_argument("--workloads", type=_names(WORKLOAD_NAMES), default=list(WORKLOAD_NAMES),
                        help=f"comma-separated workloads to run (default: {','.join(WORKLOAD_NAMES)})")
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="catalog name, local directory, .gguf file or Hugging Face id (default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer requests and shorter outputs, so the whole run takes minutes")

    parser.add_argument("--doors", type=_names(DOOR_NAMES), default=list(DOOR_NAMES),
                        help="ways to call Molten: the engine in-process, a Ray Serve handle, HTTP with SSE "
                             f"(default: {','.join(DOOR_NAMES)})")
    parser.add_argument("--peers", type=_names(PEER_NAMES), default=list(PEER_NAMES),
                        help=f"peers to measure beside Molten (default: {','.join(PEER_NAMES)})")
    parser.add_argument("--dtypes", type=_names(DTYPE_NAMES), default=None,
                        help="weight and activation dtypes for the engine door and transformers; the first one is "
                             "also used by the served doors and the single-dtype workloads (default: float32, plus "
                             "bfloat16 when the CPU has bfloat16 instructions)")
    parser.add_argument("--quantized", type=_names(QUANTIZED_NAMES), default=list(QUANTIZED_NAMES),
                        help="integer weight precisions the single workload also runs the engine door in, to find "
                             "Molten's fastest precision; an empty string runs none "
                             f"(default: {','.join(QUANTIZED_NAMES)})")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads for Molten and transformers, and llama.cpp threads (default: all cores, "
                             "%(default)s here)")

    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts and arrival times (default: 0)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="context window in tokens (default: the model's own, at most 8192)")
    parser.add_argument("--kv-cache-mib", type=int, default=2048,
                        help="KV cache memory per engine in MiB (default: %(default)s)")
    parser.add_argument("--run-timeout", type=float, default=3600.0,
                        help="seconds one measured run may take before it is stopped and marked failed "
                             "(default: %(default)s)")

    parser.add_argument("--output", type=Path, default=Path("docs/benchmarks.md"),
                        help="markdown page to write; plots go into a folder of the same name "
                             "without .md (default: %(default)s)")
    parser.add_argument("--note", default=None, help="a paragraph to print on the page, such as the machine's load")
    parser.add_argument("--profile", action="store_true",
                        help="also profile Molten's decode step (cProfile phases and torch operators)")
    parser.add_argument("--save-results", type=Path, default=None,
                        help="also pickle the raw results to this file, so --render-from can rewrite the page")
    parser.add_argument("--render-from", type=Path, default=None,
                        help="measure nothing: rewrite the page from a file written by --save-results, with this "
                             "version's report code (the page keeps the original run's command)")


def main(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """Run the benchmark for parsed `args`; print the tables and write the page. Returns the exit code.

    The exit code is 1 when any measurement failed (skipped peers do not count).
    """
    from molten.bench.context import BenchOptions, Skipped
    from molten.bench.report import render_console, write_report
    from molten.bench.runner import render_saved, run_bench

    from molten.bench.hardware import default_dtypes

    if args.render_from is not None:
        if not args.render_from.is_file():
            print(f"molten bench: error: --render-from {args.render_from}: file not found; pass a file written by "
                  "--save-results", file=sys.stderr)
            return 2
        report, context = render_saved(args.render_from)
        written = write_report(report, context.options.output, context.options.plot_dir)
        print("wrote " + ", ".join(str(path) for path in written))
        return 0

    command_args = sys.argv[1:] if argv is None else argv
    dtypes, dtype_note = (args.dtypes, None) if args.dtypes else default_dtypes()
    options = BenchOptions(
        workloads=args.workloads,
        model=args.model,
        quick=args.quick,
        output=args.output,
        doors=args.doors,
        dtypes=dtypes,
        dtype_note=dtype_note,
        quantized=args.quantized,
        peers=args.peers,
        num_threads=args.threads,
        seed=args.seed,
        max_model_len=args.max_model_len,
        kv_cache_memory_mib=args.kv_cache_mib,
        run_time_limit_s=args.run_timeout,
        note=args.note,
        profile=args.profile,
        save_results=args.save_results,
        command="molten " + shlex.join(command_args),
    )
    try:
        options.validate()
    except ValueError as exc:
        print(f"molten bench: error: {exc}", file=sys.stderr)
        return 2
    report, context = run_bench(options)
    print(render_console(report))
    written = write_report(report, options.output, options.plot_dir)
    print("wrote " + ", ".join(str(path) for path in written))
    failed = [key for key, result in context.results.items() if isinstance(result, Skipped) and result.failed]
    if failed:
        print(f"molten bench: {len(failed)} measurement(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
