"""Molten's Prometheus metrics, defined with Ray's metrics API and recorded by the engine workers.

Ray's metrics agent exports them in Prometheus text format on each node's metrics
export port, with the prefix `ray_` (so `molten_time_to_first_token_seconds` is scraped
as `ray_molten_time_to_first_token_seconds`). docs/metrics.md lists every metric.

Timing definitions, chosen so the numbers match what a client measures:
- arrival: the ingress stamps it when the HTTP request comes in (`PreparedRequest`).
- TTFT: arrival to the moment the worker hands the first token to the ingress. In
  disaggregated mode that is after the KV export, because the first token leaves the
  prefill worker together with the handoff.
- ITL: time between two tokens handed to the ingress. The decode worker measures its
  first gap from the end of the prefill worker's KV export (`KVHandoff.created_at`).
- end-to-end: arrival to the hand-off of the last token.
- queue time: arrival to the first engine step that schedules the request.

Ray 2.60 rebuilds a histogram's `_sum` from bucket midpoints when it exports, so that sum
is approximate. Each latency histogram therefore has an exact companion counter,
`<histogram name>_total`, that adds up the observed seconds: its value divided by the
histogram's `_count` is the exact mean.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator

from ray.util.metrics import Counter, Gauge, Histogram

from molten.engine.events import TokenEvent

logger = logging.getLogger(__name__)

TAG_KEYS = ("model", "role", "application")
"""Tags on every Molten metric: served model id, worker role, and Serve application name."""

LATENCY_BOUNDARIES_S = [
    0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
    1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
]
"""Histogram bucket upper bounds for latencies, in seconds."""

GAUGE_REFRESH_S = 5.0
"""Seconds between re-sends of every gauge's last value. Ray 2.60's metrics agent drops a
gauge series that was not set for two export intervals (about 20 s with the 10 s interval
seen here), and an idle worker sets none."""

HANDOFF_BYTES_BOUNDARIES = [float(2**exponent) for exponent in range(16, 32, 2)]
"""Histogram bucket upper bounds for KV handoff sizes: 64 KiB to 1 GiB by factors of 4."""

ACCEPTED_LENGTH_BOUNDARIES = [count + 0.5 for count in range(17)]
"""Histogram bucket upper bounds for drafts accepted per verification, 0 to 16 (the most
`num_speculative_tokens` allows). Ray needs positive bounds, so bucket `a + 0.5` counts
the verifications that accepted at most `a` drafts."""


def current_application() -> str:
    """Name of the Serve application this replica belongs to, or "" outside a Serve replica."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        return serve.get_replica_context().app_name
    except RayServeException:
        return ""


class EngineMetrics:
    """The metrics of one engine worker, with its model, role and application as default tags.

    Create it inside the worker's process (a Ray actor), because Ray's metrics export
    from the process that records them.
    """

    def __init__(self, model_id: str, role: str, application: str):
        self.role = role
        self.num_token_errors = 0
        self._define_latencies()
        self._define_counters()
        self._define_gauges()
        self._define_spec_metrics()
        tags = {"model": model_id, "role": role, "application": application}
        for metric in (
            self.ttft, self.itl, self.e2e, self.queue_time, self.step_time, *self.latency_totals.values(),
            self.prompt_tokens,
            self.generation_tokens, self.requests_finished, self.prefix_queried_tokens, self.prefix_hit_tokens,
            self.prefix_hit_rate, self.num_running, self.num_waiting, self.kv_blocks_used, self.kv_blocks_free,
            self.handoff_bytes, self.handoff_bytes_total, self.handoff_time, self.model_memory,
            self.spec_draft_tokens, self.spec_accepted_tokens, self.spec_emitted_tokens, self.spec_accepted_length,
        ):
            metric.set_default_tags(tags)
        self._prefix_queried_seen = 0
        self._prefix_hits_seen = 0
        self._spec_step_seen: int | None = None
        self._gauge_values: dict[tuple, tuple[Gauge, float, dict | None]] = {}
        self._gauge_lock = threading.Lock()
        self._stop = threading.Event()
        threading.Thread(target=self._refresh_gauges, name=f"molten-{role}-gauges", daemon=True).start()

    def _set_gauge(self, gauge: Gauge, value: float, tags: dict | None = None) -> None:
        """Set a gauge and remember the value, so `_refresh_gauges` can send it again."""
        gauge.set(value, tags=tags)
        key = (gauge.info["name"], tuple(sorted((tags or {}).items())))
        with self._gauge_lock:
            self._gauge_values[key] = (gauge, value, tags)

    def _refresh_gauges(self) -> None:
        while not self._stop.wait(GAUGE_REFRESH_S):
            with self._gauge_lock:
                values = list(self._gauge_values.values())
            for gauge, value, tags in values:
                gauge.set(value, tags=tags)

    def stop(self) -> None:
        """Stop re-sending gauge values."""
        self._stop.set()

    def _define_latencies(self) -> None:
        self.ttft = Histogram(
            "molten_time_to_first_token_seconds",
            description="Time from a request's arrival at the ingress to its first token leaving the worker, in seconds.",
            boundaries=LATENCY_BOUNDARIES_S,
            tag_keys=TAG_KEYS,
        )
        self.itl = Histogram(
            "molten_inter_token_latency_seconds",
            description="Time between two consecutive tokens of one sequence leaving the workers, in seconds.",
            boundaries=LATENCY_BOUNDARIES_S,
            tag_keys=TAG_KEYS,
        )
        self.e2e = Histogram(
            "molten_e2e_request_latency_seconds",
            description="Time from a request's arrival at the ingress to its last token leaving the worker, in seconds.",
            boundaries=LATENCY_BOUNDARIES_S,
            tag_keys=TAG_KEYS,
        )
        self.queue_time = Histogram(
            "molten_request_queue_time_seconds",
            description="Time from a request's arrival to the first engine step that schedules it, in seconds.",
            boundaries=LATENCY_BOUNDARIES_S,
            tag_keys=TAG_KEYS,
        )
        self.step_time = Histogram(
            "molten_engine_step_seconds",
            description="Wall time of one engine step (schedule, forward, update), in seconds.",
            boundaries=LATENCY_BOUNDARIES_S,
            tag_keys=TAG_KEYS,
        )
        self.handoff_time = Histogram(
            "molten_kv_handoff_seconds",
            description="Export, transfer and import time of one KV handoff, in seconds.",
            boundaries=LATENCY_BOUNDARIES_S,
            tag_keys=TAG_KEYS,
        )

    def _define_counters(self) -> None:
        self.latency_totals = {
            histogram: Counter(
                f"{histogram.info['name']}_total",
                description=f"Sum of the observations of {histogram.info['name']}, exact, in seconds.",
                tag_keys=TAG_KEYS,
            )
            for histogram in (self.ttft, self.itl, self.e2e, self.queue_time)
        }
        self.prompt_tokens = Counter(
            "molten_prompt_tokens_total",
            description="Prompt tokens of requests that produced their first token.",
            tag_keys=TAG_KEYS,
        )
        self.generation_tokens = Counter(
            "molten_generation_tokens_total",
            description="Generated tokens handed to the ingress.",
            tag_keys=TAG_KEYS,
        )
        self.requests_finished = Counter(
            "molten_requests_finished_total",
            description="Sequences that finished, by finish_reason (stop or length).",
            tag_keys=(*TAG_KEYS, "finish_reason"),
        )
        self.prefix_queried_tokens = Counter(
            "molten_prefix_cache_queried_tokens_total",
            description="Prompt tokens looked up in the prefix cache.",
            tag_keys=TAG_KEYS,
        )
        self.prefix_hit_tokens = Counter(
            "molten_prefix_cache_hit_tokens_total",
            description="Prompt tokens whose KV blocks the prefix cache already held.",
            tag_keys=TAG_KEYS,
        )
        self.handoff_bytes = Histogram(
            "molten_kv_handoff_bytes",
            description="Bytes of KV blocks one disaggregated request moved from the prefill to the decode worker.",
            boundaries=HANDOFF_BYTES_BOUNDARIES,
            tag_keys=TAG_KEYS,
        )
        self.handoff_bytes_total = Counter(
            "molten_kv_handoff_bytes_total",
            description="Bytes of KV blocks moved from prefill to decode workers.",
            tag_keys=TAG_KEYS,
        )

    def _define_gauges(self) -> None:
        self.prefix_hit_rate = Gauge(
            "molten_prefix_cache_hit_rate",
            description="Hit tokens / queried tokens of the prefix cache since the worker started (0 to 1).",
            tag_keys=TAG_KEYS,
        )
        self.num_running = Gauge(
            "molten_num_requests_running",
            description="Sequences in the engine's running batch after the last step.",
            tag_keys=TAG_KEYS,
        )
        self.num_waiting = Gauge(
            "molten_num_requests_waiting",
            description="Sequences waiting to be scheduled after the last step.",
            tag_keys=TAG_KEYS,
        )
        self.kv_blocks_used = Gauge(
            "molten_kv_blocks_used",
            description="KV blocks held by live sequences.",
            tag_keys=TAG_KEYS,
        )
        self.kv_blocks_free = Gauge(
            "molten_kv_blocks_free",
            description="KV blocks on the free list, including cached blocks that can be evicted.",
            tag_keys=TAG_KEYS,
        )
        self.model_memory = Gauge(
            "molten_model_memory_bytes",
            description="Bytes a worker uses for its model, by kind: weights or kv_cache.",
            tag_keys=(*TAG_KEYS, "kind"),
        )

    def _observe_latency(self, histogram: Histogram, seconds: float) -> None:
        """Record `seconds` in a latency histogram and in its exact sum counter."""
        seconds = max(0.0, seconds)
        histogram.observe(seconds)
        if seconds > 0:  # Ray counters reject increments of 0
            self.latency_totals[histogram].inc(seconds)

    # -- per token, on the worker's asyncio side ----------------------------------------

    def observe_token(self, event: TokenEvent, now: float, arrival_time: float, previous_token_time: float | None) -> None:
        """Record one token handed to the ingress at `now` (unix seconds)."""
        self.generation_tokens.inc()
        if event.index == 0 and event.seq_index == 0:
            # One TTFT per request: with n > 1 every sequence has an index-0 token.
            self._observe_latency(self.ttft, now - arrival_time)
            self.prompt_tokens.inc(event.num_prompt_tokens)
        elif previous_token_time is not None:
            self._observe_latency(self.itl, now - previous_token_time)
        if event.handoff is not None:
            self.handoff_bytes.observe(event.handoff.num_bytes)
            self.handoff_bytes_total.inc(event.handoff.num_bytes)
            self.handoff_time.observe(event.handoff.total_ms / 1000)
        if event.finish_reason is not None:
            self._observe_latency(self.e2e, now - arrival_time)
            self.requests_finished.inc(tags={"finish_reason": event.finish_reason})

    async def track(
        self, events: AsyncIterator[TokenEvent], arrival_time: float, previous_token_time: float | None = None
    ) -> AsyncIterator[TokenEvent]:
        """Yield `events` unchanged, recording each token as it leaves the worker.

        Closing this stream closes `events`, so an early stop still aborts the request.
        A request with several sequences (n > 1) gets one ITL chain per sequence.
        """
        previous: dict[int, float] = {}
        try:
            async for event in events:
                now = time.time()
                try:
                    self.observe_token(event, now, arrival_time, previous.get(event.seq_index, previous_token_time))
                except Exception:
                    # A metrics failure must never end the client's stream.
                    self.num_token_errors += 1
                    if self.num_token_errors == 1:
                        logger.exception("recording token metrics failed; later failures are counted, not logged")
                previous[event.seq_index] = now
                yield event
        finally:
            await events.aclose()

    # -- per step, on the engine thread ---------------------------------------------------

    def observe_step(self, engine, events: list[TokenEvent], elapsed_s: float) -> None:
        """Step listener for `AsyncEngine.step_listeners`: queue times, step time, batch and KV gauges, speculation."""
        self.step_time.observe(elapsed_s)
        record = engine.step_stats.last()
        if record is not None:
            for admitted in record.admitted:
                self._observe_latency(self.queue_time, admitted["queue_ms"] / 1000)
        scheduler = engine.scheduler
        block_manager = engine.block_manager
        self._set_gauge(self.num_running, len(scheduler.running))
        self._set_gauge(self.num_waiting, len(scheduler.waiting))
        self._set_gauge(self.kv_blocks_free, block_manager.num_free_blocks)
        self._set_gauge(self.kv_blocks_used, block_manager.num_blocks - block_manager.num_free_blocks)
        stats = block_manager.prefix_stats
        if stats.num_queried_tokens != self._prefix_queried_seen:
            # Ray counters reject increments of 0.
            self.prefix_queried_tokens.inc(stats.num_queried_tokens - self._prefix_queried_seen)
            if stats.num_hit_tokens > self._prefix_hits_seen:
                self.prefix_hit_tokens.inc(stats.num_hit_tokens - self._prefix_hits_seen)
            self._prefix_queried_seen = stats.num_queried_tokens
            self._prefix_hits_seen = stats.num_hit_tokens
            self._set_gauge(self.prefix_hit_rate, stats.hit_rate)
        self.observe_spec_step(getattr(engine, "last_spec_step", None))

    def _define_spec_metrics(self) -> None:
        self.spec_draft_tokens = Counter(
            "molten_spec_draft_tokens_total",
            description="Draft tokens the target model verified under speculative decoding.",
            tag_keys=TAG_KEYS,
        )
        self.spec_accepted_tokens = Counter(
            "molten_spec_accepted_tokens_total",
            description="Draft tokens the target model accepted.",
            tag_keys=TAG_KEYS,
        )
        self.spec_emitted_tokens = Counter(
            "molten_spec_emitted_tokens_total",
            description="Tokens verifications emitted: accepted drafts plus one recovered or bonus token each.",
            tag_keys=TAG_KEYS,
        )
        self.spec_accepted_length = Histogram(
            "molten_spec_accepted_length",
            description="Draft tokens accepted by one verification (one sequence in one target step).",
            boundaries=ACCEPTED_LENGTH_BOUNDARIES,
            tag_keys=TAG_KEYS,
        )

    def observe_spec_step(self, spec_step) -> None:
        """Record one step's speculation (`LLMEngine.last_spec_step`) once; None or an already seen step is skipped."""
        if spec_step is None or spec_step.totals is None or spec_step.step_id == self._spec_step_seen:
            return
        self._spec_step_seen = spec_step.step_id
        totals = spec_step.totals
        # Ray counters reject increments of 0.
        for counter, value in (
            (self.spec_draft_tokens, totals.num_draft_tokens),
            (self.spec_accepted_tokens, totals.num_accepted_tokens),
            (self.spec_emitted_tokens, totals.num_emitted_tokens),
        ):
            if value > 0:
                counter.inc(value)
        for accepted, count in enumerate(totals.accepted_length_histogram):
            for _ in range(count):
                self.spec_accepted_length.observe(accepted)

    def set_model_memory(self, weight_bytes: int, kv_cache_bytes: int) -> None:
        self._set_gauge(self.model_memory, weight_bytes, tags={"kind": "weights"})
        self._set_gauge(self.model_memory, kv_cache_bytes, tags={"kind": "kv_cache"})
