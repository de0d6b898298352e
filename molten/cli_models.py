"""`molten models load|unload|swap|status|alias`: drive a running server's model manager over HTTP.

These commands talk to `molten serve` through its `/v1/molten/models` routes, so they
work from any terminal and never import Ray.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
POLL_INTERVAL_S = 0.5


def add_manager_commands(model_commands: argparse._SubParsersAction) -> None:
    """Add load, unload, swap, status and alias to the `molten models` subcommands."""
    load = model_commands.add_parser("load", help="load a model into a running server and show its progress")
    load.add_argument("model", help="catalog name, local directory, .gguf file or Hugging Face id")
    _add_model_options(load)
    load.add_argument("--no-wait", action="store_true", help="return at once instead of waiting until it is ready")
    _add_url_options(load, timeout=600.0)
    load.set_defaults(run=run_load)

    unload = model_commands.add_parser(
        "unload", help="unload a model; streams already running on it finish first (up to the drain timeout)"
    )
    unload.add_argument("model", help="id of a loaded model")
    _add_url_options(unload, timeout=600.0)
    unload.set_defaults(run=run_unload)

    swap = model_commands.add_parser(
        "swap", help="replace a loaded model with another: aliases move to the new one, the old one drains"
    )
    swap.add_argument("old", help="id of the loaded model to replace")
    swap.add_argument("new", help="model to load in its place")
    _add_model_options(swap)
    _add_url_options(swap, timeout=600.0)
    swap.set_defaults(run=run_swap)

    status = model_commands.add_parser(
        "status", help="show loaded models: state, memory ledger, cold-start time, requests in flight"
    )
    status.add_argument("model", nargs="?", help="show one model's full record as JSON")
    status.add_argument("--json", action="store_true", help="print the manager's whole status as JSON")
    _add_url_options(status, timeout=30.0)
    status.set_defaults(run=run_status)

    alias = model_commands.add_parser(
        "alias", help="point an alias at one model, or split it between models by weight (A/B)"
    )
    alias.add_argument("alias", help="name clients send in `model`")
    alias.add_argument(
        "targets", nargs="*", help="MODEL or MODEL=WEIGHT, e.g. `small=9 large=1` sends 10%% of requests to large"
    )
    alias.add_argument("--delete", action="store_true", help="delete the alias")
    _add_url_options(alias, timeout=30.0)
    alias.set_defaults(run=run_alias)


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16", "int8", "int4"),
        help="weight precision; appended to the model id as `MODEL:PRECISION` (default: fp32)",
    )
    parser.add_argument(
        "--mode",
        choices=("disaggregated", "colocated"),
        help="disaggregated (prefill and decode workers) or colocated (one worker) (default: the server's mode)",
    )


def _add_url_options(parser: argparse.ArgumentParser, timeout: float) -> None:
    parser.add_argument(
        "--url", default=DEFAULT_URL, help="base URL of a running `molten serve` (default: %(default)s)"
    )
    parser.add_argument(
        "--timeout", type=float, default=timeout, help="seconds to wait for the server (default: %(default)s)"
    )


class CommandError(Exception):
    """A failed request, with a message for the terminal."""


def _request(args: argparse.Namespace, method: str, path: str, body: dict | None = None) -> dict:
    url = args.url.rstrip("/") + path
    try:
        response = httpx.request(method, url, json=body, timeout=args.timeout, trust_env=False)
    except httpx.TimeoutException:
        raise CommandError(f"{method} {url} timed out after {args.timeout:.0f} s; raise --timeout") from None
    except httpx.HTTPError as exc:
        raise CommandError(f"could not reach {url}: {exc}. Is `molten serve` running there? (see --url)") from None
    try:
        data = response.json()
    except ValueError:
        raise CommandError(f"{method} {url} returned HTTP {response.status_code}: {response.text[:200]}") from None
    if response.status_code >= 400:
        message = data.get("error", {}).get("message") if isinstance(data, dict) else None
        raise CommandError(f"HTTP {response.status_code}: {message or response.text[:200]}")
    return data


def _fail(error: CommandError) -> int:
    print(f"molten models: error: {error}", file=sys.stderr)
    return 1


def run_load(args: argparse.Namespace) -> int:
    body = {"model": args.model, "precision": args.precision, "mode": args.mode, "wait": False}
    try:
        record = _request(args, "POST", "/v1/molten/models/load", body)
        if args.no_wait:
            print(f"{record['model_id']}: {record['state']}")
            return 0
        record = _follow_load(args, record)
    except CommandError as exc:
        return _fail(exc)
    return _print_load_result(record)


def _follow_load(args: argparse.Namespace, record: dict) -> dict:
    """Poll the model's record until it leaves `loading`, printing each new progress line."""
    num_shown = 0
    deadline = time.monotonic() + args.timeout
    while True:
        for stage in record["progress"][num_shown:]:
            print(f"[{stage['elapsed_s']:7.1f} s] {stage['stage']}: {stage['message']}", file=sys.stderr, flush=True)
        num_shown = len(record["progress"])
        if record["state"] != "loading":
            return record
        if time.monotonic() > deadline:
            raise CommandError(
                f"{record['model_id']} is still loading after {args.timeout:.0f} s; check `molten models status`"
            )
        time.sleep(POLL_INTERVAL_S)
        record = _request(args, "GET", f"/v1/molten/models/{record['model_id']}")


def _print_load_result(record: dict) -> int:
    if record["state"] != "ready":
        print(f"molten models: error: {record['model_id']} is {record['state']}: {record['error']}", file=sys.stderr)
        return 1
    memory = record["memory"]
    print(
        f"{record['model_id']} is ready ({record['mode']}): cold start {record['cold_start_seconds']:.2f} s, "
        f"weights {_mib(memory['weight_bytes'])}, KV pool {_mib(memory['kv_pool_bytes'])}, "
        f"other {_mib(memory['other_bytes'])}"
    )
    return 0


def run_unload(args: argparse.Namespace) -> int:
    try:
        record = _request(args, "POST", "/v1/molten/models/unload", {"model": args.model, "wait": False})
        record = _follow_unload(args, record)
    except CommandError as exc:
        return _fail(exc)
    print(f"{record['model_id']} is {record['state']} (drained in {record['drain_seconds'] or 0:.2f} s)")
    return 0


def _follow_unload(args: argparse.Namespace, record: dict) -> dict:
    """Poll the model's record until it is unloaded, printing what the unload waits for when that changes."""
    started = time.monotonic()
    deadline = started + args.timeout
    last = None
    while record["state"] not in ("unloaded", "failed"):
        if record["state"] == "draining" and record["in_flight"]:
            waiting = f"draining: waiting for {record['in_flight']} running request(s) to finish"
        elif record["state"] == "draining":
            waiting = "deleting the worker processes"
        else:
            waiting = f"{record['state']}: waiting for the unload to start"
        if waiting != last:
            print(f"[{time.monotonic() - started:7.1f} s] {waiting}", file=sys.stderr, flush=True)
            last = waiting
        if time.monotonic() > deadline:
            raise CommandError(
                f"{record['model_id']} is still {record['state']} after {args.timeout:.0f} s; "
                "check `molten models status`"
            )
        time.sleep(POLL_INTERVAL_S)
        record = _request(args, "GET", f"/v1/molten/models/{record['model_id']}")
    return record


def run_swap(args: argparse.Namespace) -> int:
    body = {"old": args.old, "new": args.new, "precision": args.precision, "mode": args.mode}
    try:
        outcome = _request(args, "POST", "/v1/molten/models/swap", body)
    except CommandError as exc:
        return _fail(exc)
    new = outcome["new"]
    print(
        f"swapped {outcome['old']['model_id']} ({outcome['old']['state']}) for {new['model_id']} ({new['state']}) "
        f"in {outcome['swap_seconds']:.2f} s"
        + (f"; aliases moved: {', '.join(outcome['aliases_moved'])}" if outcome["aliases_moved"] else "")
    )
    return 0 if new["state"] == "ready" else 1


def run_status(args: argparse.Namespace) -> int:
    try:
        if args.model:
            print(json.dumps(_request(args, "GET", f"/v1/molten/models/{args.model}"), indent=2))
            return 0
        status = _request(args, "GET", "/v1/molten/models")
    except CommandError as exc:
        return _fail(exc)
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(format_status(status))
    return 0


def format_status(status: dict) -> str:
    """Render the manager's status as a table of models, then aliases and the memory budget."""
    rows = [("MODEL", "STATE", "MODE", "WORKERS", "WEIGHTS", "KV POOL", "OTHER", "TOTAL", "COLD START", "IN FLIGHT")]
    for record in status["models"]:
        memory = record["memory"]
        cold = f"{record['cold_start_seconds']:.2f} s" if record["cold_start_seconds"] is not None else "-"
        state = record["state"] if record["state"] != "loading" else f"loading ({record['progress_stage']})"
        total = _mib(memory["total_bytes"])
        if record["state"] == "loading" and memory.get("estimated"):
            total += " (est.)"
        elif record["state"] in ("unloaded", "failed") and memory.get("released_bytes"):
            total = f"0 ({_mib(memory['released_bytes'])} released)"
        rows.append(
            (
                record["model_id"],
                state,
                record["mode"],
                str(memory.get("num_workers", 1)),
                _mib(memory["weight_bytes"]),
                _mib(memory["kv_pool_bytes"]),
                _mib(memory["other_bytes"]),
                total,
                cold,
                str(record["in_flight"]),
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.append("Memory columns are summed over each model's WORKERS (processes); (est.) marks an estimate.")
    for record in status["models"]:
        if record["state"] == "failed":
            lines.append(f"{record['model_id']} failed: {record['error']}")
    for alias, targets in status["aliases"].items():
        lines.append(
            f"alias {alias} -> " + ", ".join(f"{model} (weight {weight:g})" for model, weight in targets.items())
        )
    budget = status["memory"]
    loading = budget.get("loading_estimate_bytes")
    loading_text = f"; {_mib(loading)} more estimated for models still loading" if loading else ""
    if budget["budget_bytes"] is None:
        lines.append(f"memory: {_mib(budget['used_bytes'])} used by ready models{loading_text}; no budget set")
    else:
        lines.append(
            f"memory: {_mib(budget['used_bytes'])} used by ready models of a {_mib(budget['budget_bytes'])} budget"
            f"{loading_text} ({_mib(budget['free_bytes'])} free)"
        )
    return "\n".join(lines)


def run_alias(args: argparse.Namespace) -> int:
    try:
        if args.delete:
            _request(args, "DELETE", f"/v1/molten/models/aliases/{args.alias}")
            print(f"deleted alias {args.alias}")
            return 0
        if not args.targets:
            raise CommandError("name at least one target model, or pass --delete")
        targets = {}
        for target in args.targets:
            model, _, weight = target.partition("=")
            try:
                targets[model] = float(weight) if weight else 1.0
            except ValueError:
                raise CommandError(f"weight of {model!r} must be a number, got {weight!r}") from None
        result = _request(args, "PUT", f"/v1/molten/models/aliases/{args.alias}", {"targets": targets})
    except CommandError as exc:
        return _fail(exc)
    print(
        f"alias {result['alias']} -> "
        + ", ".join(f"{model} ({weight:g})" for model, weight in result["targets"].items())
    )
    return 0


def _mib(num_bytes: int | None) -> str:
    return "-" if num_bytes is None else f"{num_bytes / 2**20:.1f} MiB"
