"""Names and titles of the learning-path stages, importable without torch.

`molten experiment --help` is built from this list, so the command starts fast; the
stage modules (molten/experiments/stages/) import the engine. `stages.STAGES` checks at
import that both agree.
"""

from __future__ import annotations

STAGE_LIST: tuple[tuple[int, str, str], ...] = (
    (1, "model-size", "Model size and precision against latency and memory"),
    (2, "quantization", "Quantization comparison"),
    (3, "batch-size", "Batch size against throughput and latency"),
    (4, "context-length", "Context length against TTFT and ITL"),
    (5, "disaggregation", "Disaggregated against co-located"),
    (6, "speculative", "Speculative decoding: speedup against k and acceptance"),
    (7, "parallel-sampling", "Parallel sampling memory"),
)
"""(number, command-line name, title) of each stage, in learning-path order."""
