"""The playground's Models tab: load, unload and swap models, their memory ledgers, and a side-by-side compare.

Everything goes through the ingress's deployment handle: `manager_request` forwards to the
model manager (`molten:model-manager`), and `compare_events` streams one prompt to 2-4
models at once. The formatting functions are plain, so tests can check them without a browser.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import gradio as gr
import pandas as pd

PRECISIONS = ("fp32", "bf16", "fp16", "int8", "int4")
MODES = ("colocated", "disaggregated")
MAX_COMPARE_MODELS = 4
REFRESH_INTERVAL_S = 2.0
"""How often the tab re-reads the manager's status, so load progress and memory stay current."""

MODEL_COLUMNS = (
    "model",
    "state",
    "mode",
    "progress",
    "workers",
    "weights MiB",
    "KV pool MiB",
    "other MiB",
    "total MiB",
    "load s",
    "cold start s",
    "in flight",
)
COLD_START_COLUMNS = ("model", "mode", "load s", "cold start s", "total MiB", "swap of")
COMPARE_COLUMNS = ("model", "TTFT ms", "tokens", "decode tokens/s", "end to end ms", "finish")


def _mib(num_bytes: int | None) -> float | None:
    return None if num_bytes is None else round(num_bytes / 2**20, 1)


def models_frame(status: Mapping[str, Any]) -> pd.DataFrame:
    """Build one row per model the manager tracks: state, load progress, memory ledger and cold-start time."""
    rows = []
    for record in status.get("models", []):
        memory = record["memory"]
        progress = record["progress"][-1]["message"] if record["progress"] else ""
        if record["state"] == "failed":
            progress = f"failed: {record['error']}"
        elif record["state"] == "unloaded" and memory.get("released_bytes"):
            progress = f"unloaded; released {_mib(memory['released_bytes'])} MiB"
        elif record["state"] == "loading" and memory.get("estimated"):
            progress = f"{progress} (total MiB is an estimate)"
        rows.append(
            (
                record["model_id"],
                record["state"],
                record["mode"],
                progress,
                memory.get("num_workers", 1),
                _mib(memory["weight_bytes"]),
                _mib(memory["kv_pool_bytes"]),
                _mib(memory["other_bytes"]),
                _mib(memory["total_bytes"]),
                record["load_seconds"] and round(record["load_seconds"], 2),
                record["cold_start_seconds"] and round(record["cold_start_seconds"], 2),
                record["in_flight"],
            )
        )
    return pd.DataFrame(rows, columns=list(MODEL_COLUMNS))


def cold_starts_frame(status: Mapping[str, Any]) -> pd.DataFrame:
    """Build one row per load so far, newest first: load request → workers up, and → first token."""
    rows = [
        (
            entry["model_id"],
            entry["mode"],
            entry["load_seconds"],
            entry["cold_start_seconds"],
            _mib(entry["total_bytes"]),
            entry.get("swap_of") or "",
        )
        for entry in reversed(status.get("cold_starts", []))
    ]
    return pd.DataFrame(rows, columns=list(COLD_START_COLUMNS))


def memory_markdown(status: Mapping[str, Any]) -> str:
    """Render the budget line, the system view (RSS of Molten's processes, GPU memory) and the aliases."""
    budget = status.get("memory", {})
    used = _mib(budget.get("used_bytes")) or 0
    loading = budget.get("loading_estimate_bytes")
    loading_text = f" ({_mib(loading)} MiB more estimated for models still loading)" if loading else ""
    if budget.get("budget_bytes") is None:
        lines = [
            f"**Memory:** {used} MiB used by ready models (summed over their workers){loading_text}; no budget set."
        ]
    else:
        budget_text = (
            f"**Memory:** {used} MiB used by ready models of a {_mib(budget['budget_bytes'])} MiB budget"
            f"{loading_text} ({_mib(budget['free_bytes'])} MiB free)."
        )
        lines = [budget_text]
    system = status.get("system") or {}
    if system:
        lines.append(
            f"System view: Molten's manager, ingress and worker processes use {_mib(system['molten_rss_bytes'])} MiB "
            f"RSS; the machine uses {_mib(system['system_used_bytes'])} of {_mib(system['system_total_bytes'])} MiB."
        )
        gpu = system.get("gpu")
        if gpu:
            for device in gpu["devices"]:
                lines.append(
                    f"GPU {device['index']}: {_mib(device['used_bytes'])} of {_mib(device['total_bytes'])} MiB used."
                )
        else:
            lines.append("No NVIDIA GPU found: the ledger shows process RSS and the bytes of the engine's tensors.")
    for alias, targets in (status.get("aliases") or {}).items():
        split = ", ".join(f"`{model}` (weight {weight:g})" for model, weight in targets.items())
        lines.append(f"Alias `{alias}` → {split}")
    return "\n\n".join(lines)


def ready_model_ids(status: Mapping[str, Any]) -> list[str]:
    return [record["model_id"] for record in status.get("models", []) if record["state"] == "ready"]


class CompareView:
    """Accumulates compare items into each model's text and a timings table."""

    def __init__(self, models: list[str]):
        self.models = models
        self.texts = [""] * len(models)
        self.done: dict[int, dict] = {}
        self.errors: dict[int, str] = {}

    def add(self, item: Mapping[str, Any]) -> None:
        index = item.get("index")
        if item["type"] == "error":
            message = item["error"].get("message", "request failed")
            if index is None:
                self.errors = {i: message for i in range(len(self.models))}
            else:
                self.errors[index] = message
        elif item["type"] == "token":
            self.texts[index] += item["text"]
        elif item["type"] == "done":
            self.done[index] = dict(item)

    def text_of(self, index: int) -> str:
        if index in self.errors:
            return f"⚠️ {self.errors[index]}"
        return self.texts[index]

    def timings_frame(self) -> pd.DataFrame:
        rows = []
        for index, model in enumerate(self.models):
            done = self.done.get(index, {})
            rows.append(
                (
                    model,
                    done.get("ttft_ms"),
                    done.get("num_tokens"),
                    done.get("decode_tokens_per_s"),
                    done.get("e2e_ms"),
                    done.get("finish_reason") or ("error" if index in self.errors else ""),
                )
            )
        return pd.DataFrame(rows, columns=list(COMPARE_COLUMNS))


class ModelsController:
    """Connects the Models tab's events to the ingress handle."""

    def __init__(self, handle_factory: Callable[[], Any]):
        self.handle_factory = handle_factory

    async def status(self) -> dict:
        return await self.handle_factory().manager_request.remote("status")

    async def refresh(self):
        """Return the tab's status outputs: models table, cold starts, memory text, and the ready models
        as choices of the compare and swap dropdowns."""
        try:
            status = await self.status()
        except Exception as exc:  # the server may be starting or stopping; show it and keep polling
            message = f"Could not read the model manager: {exc}"
            return models_frame({}), cold_starts_frame({}), message, gr.Dropdown(), gr.Dropdown()
        ready = ready_model_ids(status)
        return (
            models_frame(status),
            cold_starts_frame(status),
            memory_markdown(status),
            gr.Dropdown(choices=ready),
            gr.Dropdown(choices=ready),
        )

    async def act(self, action: str, model: str, precision: str, mode: str, old: str) -> str:
        """Run load, unload or swap and return a one-line Markdown result."""
        model = (model or "").strip()
        if not model:
            return "⚠️ Choose a model first."
        precision = None if precision in (None, "", "fp32") else precision
        handle = self.handle_factory()
        if action == "load":
            result = await handle.manager_request.remote("load", model, mode=mode, precision=precision, wait=False)
        elif action == "unload":
            result = await handle.manager_request.remote("unload", model, wait=True)
        else:
            if not (old or "").strip():
                return "⚠️ Choose the loaded model to replace."
            result = await handle.manager_request.remote("swap", old.strip(), model, mode=mode, precision=precision)
        if isinstance(result.get("error"), dict):
            return f"⚠️ {action} failed: {result['error']['message']}"
        if action == "swap":
            return (
                f"Swapped `{result['old']['model_id']}` for `{result['new']['model_id']}` "
                f"({result['new']['state']}) in {result['swap_seconds']:.2f} s."
            )
        return f"`{result['model_id']}` is {result['state']}."

    async def compare(self, models: list[str], prompt: str, max_tokens: float):
        """Stream one prompt to 2-4 models; yield the four text boxes and the timings table as tokens arrive."""
        models = list(models or [])[:MAX_COMPARE_MODELS]
        view = CompareView(models)
        if len(models) < 2:
            view.errors = {0: "Choose 2 to 4 ready models."} if models else {}
            yield self._compare_outputs(view)
            return
        body = {
            "models": models,
            "messages": [{"role": "user", "content": prompt or "Hello"}],
            "max_tokens": int(max_tokens),
            "temperature": 0,
        }
        stream = self.handle_factory().options(stream=True).compare_events.remote(body)
        async for item in stream:
            view.add(item)
            yield self._compare_outputs(view)

    @staticmethod
    def _compare_outputs(view: CompareView):
        boxes = []
        for index in range(MAX_COMPARE_MODELS):
            if index < len(view.models):
                boxes.append(gr.Textbox(value=view.text_of(index), label=view.models[index], visible=True))
            else:
                boxes.append(gr.Textbox(value="", visible=False))
        return (*boxes, view.timings_frame())


def build_models_tab(handle_factory: Callable[[], Any], catalog: list[str] | None = None) -> None:
    """Add the Models tab to the Blocks being built. `handle_factory` returns the ingress deployment handle."""
    if catalog is None:
        from molten.models import list_models

        catalog = [entry.name for entry in list_models()]
    controller = ModelsController(handle_factory)
    with gr.Tab("Models"):
        gr.Markdown(
            "Load, unload or swap models while the server runs. A swap moves aliases to the new model and lets "
            "streams on the old one finish before it is deleted. *Cold start* is the time from the load request "
            "to the first token."
        )
        with gr.Row():
            model_box = gr.Dropdown(
                choices=catalog or [], value=None, allow_custom_value=True, label="model (catalog name, path or hub id)"
            )
            precision_box = gr.Dropdown(list(PRECISIONS), value="fp32", label="precision")
            mode_box = gr.Radio(list(MODES), value="colocated", label="mode")
            old_box = gr.Dropdown(choices=[], allow_custom_value=True, label="swap: loaded model to replace")
        with gr.Row():
            load_button = gr.Button("Load", variant="primary")
            unload_button = gr.Button("Unload")
            swap_button = gr.Button("Swap")
        action_box = gr.Markdown(elem_id="molten-models-action")
        models_table = gr.Dataframe(models_frame({}), label="Models and memory ledger", interactive=False)
        memory_box = gr.Markdown(elem_id="molten-models-memory")
        cold_table = gr.Dataframe(cold_starts_frame({}), label="Cold starts (every load)", interactive=False)

        with gr.Accordion("Compare: one prompt, 2-4 models side by side", open=True):
            with gr.Row():
                compare_models = gr.Dropdown(
                    choices=[], multiselect=True, max_choices=MAX_COMPARE_MODELS, label="ready models (2-4)"
                )
                compare_tokens = gr.Slider(1, 512, value=64, step=1, label="max_tokens")
            compare_prompt = gr.Textbox(label="prompt", lines=2, value="What is a KV cache?")
            compare_button = gr.Button("Compare", variant="primary")
            with gr.Row():
                compare_boxes = [
                    gr.Textbox(lines=10, visible=False, interactive=False) for _ in range(MAX_COMPARE_MODELS)
                ]
            compare_table = gr.Dataframe(CompareView([]).timings_frame(), label="Timings", interactive=False)

        status_outputs = [models_table, cold_table, memory_box, compare_models, old_box]
        timer = gr.Timer(REFRESH_INTERVAL_S)
        timer.tick(controller.refresh, None, status_outputs)
        action_inputs = [model_box, precision_box, mode_box, old_box]

        async def load(model, precision, mode, old):
            return await controller.act("load", model, precision, mode, old)

        async def unload(model, precision, mode, old):
            return await controller.act("unload", model, precision, mode, old)

        async def swap(model, precision, mode, old):
            return await controller.act("swap", model, precision, mode, old)

        load_button.click(load, action_inputs, action_box).then(controller.refresh, None, status_outputs)
        unload_button.click(unload, action_inputs, action_box).then(controller.refresh, None, status_outputs)
        swap_button.click(swap, action_inputs, action_box).then(controller.refresh, None, status_outputs)
        compare_button.click(
            controller.compare, [compare_models, compare_prompt, compare_tokens], [*compare_boxes, compare_table]
        )
