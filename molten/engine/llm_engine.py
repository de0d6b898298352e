"""The synchronous engine: admits requests and runs schedule -> execute -> update steps.

`LLMEngine` is single-threaded and owns every piece of mutable state. Serving code
drives it through `AsyncEngine` (async_engine.py), which runs the step loop on one
thread and streams `TokenEvent`s to asyncio consumers.

Disaggregated serving uses two engines. The prefill engine admits a request with
`prefill_only=True`, computes the prompt and samples the first token. Its
`export_sequence` then packs the sequence with its KV blocks into a `KVHandoff`. The
decode engine's `import_sequence` writes those blocks into its own pool, and the
sequence joins its running batch as if it had been prefilled there.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import torch

from molten.config import EngineConfig, EngineFacts
from molten.engine.beam_search import Beam, BeamGroup, select_candidates
from molten.engine.block_manager import BlockManager
from molten.engine.events import HandoffStats, TokenEvent
from molten.engine.kv_cache import KVCacheSpec, PagedKVCache, num_blocks_for_memory
from molten.engine.model_runner import ModelRunner, RunnerOutput
from molten.engine.sampler import SampledToken
from molten.engine.sampling_params import SamplingParams
from molten.engine.scheduler import QueueFullError, Scheduler, SchedulerOutput
from molten.engine.sequence import Sequence, SequenceStatus, make_generator
from molten.engine.spec_decode.proposer import build_drafter, drafting_candidates
from molten.engine.spec_decode.rejection_sampler import verify_drafts
from molten.engine.spec_decode.stats import SpecDecodeStats, SpecStepStats
from molten.engine.step_stats import StepCostModel, StepStatsRecorder
from molten.tokenization.detokenizer import IncrementalDetokenizer
from molten.tokenization.stop import StopStringMatcher

logger = logging.getLogger(__name__)

MAX_DEFAULT_MODEL_LEN = 8192


class PromptTooLongError(ValueError):
    def __init__(self, num_prompt_tokens: int, max_model_len: int):
        super().__init__(f"prompt is {num_prompt_tokens} tokens, the context window is {max_model_len}")
        self.num_prompt_tokens = num_prompt_tokens
        self.max_model_len = max_model_len


class EmptyPromptError(ValueError):
    def __init__(self) -> None:
        super().__init__("prompt must not be empty")


@dataclass
class KVHandoff:
    """A prefilled sequence and its KV blocks, as sent from the prefill to the decode worker."""

    request_id: str
    seq_index: int
    token_ids: list[int]
    num_prompt_tokens: int
    num_cached_prompt_tokens: int
    sampling_params: SamplingParams
    arrival_time: float
    priority: int
    generator_state: torch.Tensor | None
    first_token_time: float | None
    block_hashes: list[int | None]
    kv: torch.Tensor
    """[layers, 2, num_blocks, kv_block_size, kv_heads, head_dim]: K/V of tokens 0..num_prompt_tokens-1."""
    export_ms: float
    created_at: float
    """Wall-clock time the export finished, to measure transfer time on the other side."""

    @property
    def num_bytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


class OutputProcessor:
    """Per-sequence text state: incremental detokenization and stop-string hold-back."""

    def __init__(self, tokenizer, seq: Sequence):
        self.detokenizer = IncrementalDetokenizer(tokenizer, seq.token_ids[: seq.num_prompt_tokens])
        self.stop_matcher = StopStringMatcher(seq.sampling_params.stop) if seq.sampling_params.stop else None

    def replay(self, token_ids: list[int]) -> None:
        """Rebuild state for tokens already streamed elsewhere (after a KV import)."""
        for token_id in token_ids:
            self.add_token(token_id)

    def add_token(self, token_id: int) -> tuple[str, bool]:
        """Return (text to emit, whether a stop string completed)."""
        delta = self.detokenizer.add_token(token_id)
        if self.stop_matcher is None:
            return delta, False
        return self.stop_matcher.feed(delta)

    def finish(self) -> str:
        tail = self.detokenizer.flush()
        if self.stop_matcher is None:
            return tail
        text, stopped = self.stop_matcher.feed(tail)
        return text if stopped else text + self.stop_matcher.flush()


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded_model):
        """`loaded_model` is a `molten.models.LoadedModel` (model, tokenizer, eos ids, context window)."""
        config.validate()
        self.config = config
        self.model = loaded_model.model
        self.tokenizer = loaded_model.tokenizer
        model_config = self.model.config
        max_model_len = config.max_model_len or min(loaded_model.max_model_len, MAX_DEFAULT_MODEL_LEN)
        spec = KVCacheSpec(
            num_layers=model_config.num_hidden_layers,
            num_kv_heads=getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads,
            head_dim=getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads,
            dtype=next(self.model.parameters()).dtype,
            kv_block_size=config.cache.kv_block_size,
        )
        num_blocks = config.cache.num_kv_blocks or num_blocks_for_memory(spec, config.cache.kv_cache_memory_mib)
        pool_capacity = num_blocks * spec.kv_block_size
        if max_model_len > pool_capacity:
            # A sequence longer than the whole pool could never be scheduled: it would
            # preempt itself and wait forever. Cap the context window instead.
            logger.warning(
                "max_model_len %d exceeds the KV pool (%d blocks x %d tokens), so it is capped at %d tokens. "
                "Raise num_kv_blocks or kv_cache_memory_mib to keep it.",
                max_model_len, num_blocks, spec.kv_block_size, pool_capacity,
            )
            max_model_len = pool_capacity
        self.kv_cache = PagedKVCache(spec, num_blocks)
        self.block_manager = BlockManager(num_blocks, spec.kv_block_size, config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.block_manager, max_model_len)
        self.runner = ModelRunner(
            self.model,
            self.kv_cache,
            max_num_seqs=config.scheduler.max_num_seqs,
            max_num_batched_tokens=config.scheduler.max_num_batched_tokens,
            max_model_len=max_model_len,
        )
        self.drafter = build_drafter(config.speculative, loaded_model, num_blocks, spec.kv_block_size)
        self.spec_stats = SpecDecodeStats(config.speculative.num_speculative_tokens)
        """Acceptance totals over every verification this engine ran."""
        self.last_spec_step: SpecStepStats | None = None
        """Speculation in the last step that had any; None with speculation off."""
        self.facts = EngineFacts(
            model_id=loaded_model.model_id,
            max_model_len=max_model_len,
            num_kv_blocks=num_blocks,
            kv_block_size=spec.kv_block_size,
            kv_bytes_per_token=spec.bytes_per_token,
            eos_token_ids=frozenset(loaded_model.eos_token_ids),
            num_layers=spec.num_layers,
            num_kv_heads=spec.num_kv_heads,
            head_dim=spec.head_dim,
            dtype=str(spec.dtype).removeprefix("torch."),
        )
        self.sequences: dict[str, list[Sequence]] = {}
        self.outputs: dict[int, OutputProcessor] = {}
        self.prefilled: dict[str, Sequence] = {}
        self.pending_forks: dict[int, int] = {}
        self.beam_groups: dict[str, BeamGroup] = {}
        """Beam-search requests by request id."""
        self.num_forked_blocks_shared = 0
        """KV blocks that forked sequences shared instead of holding their own copies (a running total)."""
        """Sequences of `n > 1` requests still to fork off sequence 0 once its prompt is computed."""
        self.last_step: SchedulerOutput | None = None
        self.num_steps = 0
        self.step_stats = StepStatsRecorder(StepCostModel.from_model(self.model, spec.bytes_per_token), config.step_history)
        logger.info(
            "engine ready: model=%s max_model_len=%d kv_blocks=%d x %d tokens (%.1f MiB)",
            self.facts.model_id, max_model_len, num_blocks, spec.kv_block_size, self.kv_cache.num_bytes / 2**20,
        )

    # -- admission ----------------------------------------------------------------------

    def check_prompt(self, num_prompt_tokens: int) -> None:
        if num_prompt_tokens == 0:
            raise EmptyPromptError()
        if num_prompt_tokens >= self.facts.max_model_len:
            raise PromptTooLongError(num_prompt_tokens, self.facts.max_model_len)

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        *,
        arrival_time: float | None = None,
        priority: int = 0,
        prefill_only: bool = False,
    ) -> None:
        """Queue a request. Raises EmptyPromptError, PromptTooLongError or QueueFullError."""
        if request_id in self.sequences:
            raise ValueError(f"request id {request_id!r} is already in the engine")
        if (sampling_params.n != 1 or sampling_params.beam_width > 1) and prefill_only:
            raise ValueError("a prefill-only request takes one sequence: fan out n > 1 and run beam search elsewhere")
        self.check_prompt(len(prompt_token_ids))
        seq = Sequence(
            request_id=request_id,
            token_ids=list(prompt_token_ids),
            num_prompt_tokens=len(prompt_token_ids),
            sampling_params=sampling_params,
            arrival_time=arrival_time if arrival_time is not None else time.time(),
            priority=priority,
            generator=make_generator(sampling_params.seed),
            prefill_only=prefill_only,
        )
        if sampling_params.beam_width > 1:
            # Each step needs the top beam_width logprobs of every beam.
            seq.sampling_params = dataclasses.replace(sampling_params, logprobs=True, top_logprobs=sampling_params.beam_width)
            self.beam_groups[request_id] = BeamGroup(request_id, sampling_params, [Beam(seq)])
        self.scheduler.add(seq)
        self.sequences[request_id] = [seq]
        self.outputs[seq.seq_id] = OutputProcessor(self.tokenizer, seq)
        if sampling_params.n > 1:
            self.pending_forks[seq.seq_id] = sampling_params.n - 1

    def abort_request(self, request_id: str) -> bool:
        """Stop a request and free its blocks now; True if it was still in the engine."""
        seqs = self.sequences.pop(request_id, None)
        if seqs is None:
            return False
        self.beam_groups.pop(request_id, None)
        for seq in seqs:
            self.scheduler.remove(seq)
            self.pending_forks.pop(seq.seq_id, None)
            if self.drafter is not None:
                self.drafter.release(seq)
            self.prefilled.pop(request_id, None)
            seq.status = SequenceStatus.FINISHED_ABORTED
            self.outputs.pop(seq.seq_id, None)
        logger.info("aborted request %s", request_id)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the step -----------------------------------------------------------------------

    def step(self) -> list[TokenEvent]:
        started = time.perf_counter()
        spec_step = self._propose_drafts() if self.drafter is not None else None
        scheduler_output = self.scheduler.schedule()
        if scheduler_output.is_empty:
            return []
        self.scheduler.check_invariants(scheduler_output)
        pending_stats = self.step_stats.begin(scheduler_output, started)
        runner_output = self.runner.execute(scheduler_output)
        events = self._update(scheduler_output, runner_output, spec_step)
        self.step_stats.finish(pending_stats, runner_output.forward_ms)
        self.last_step = scheduler_output
        if spec_step is not None:
            self.last_spec_step = spec_step
        self.num_steps += 1
        if self.config.log_step_stats:
            logger.debug(
                "step %d: %d seqs, %d prefill + %d decode tokens, forward %.1f ms",
                scheduler_output.step_id, len(scheduler_output.scheduled), scheduler_output.num_prefill_tokens,
                scheduler_output.num_decode_tokens, runner_output.forward_ms,
            )
        return events

    def _update(
        self, scheduler_output: SchedulerOutput, runner_output: RunnerOutput, spec_step: SpecStepStats | None = None
    ) -> list[TokenEvent]:
        events = []
        batch_size = len(scheduler_output.scheduled)
        now = time.time()
        ready_beam_groups: list[BeamGroup] = []
        for item in scheduler_output.scheduled:
            seq = item.seq
            if item.num_draft_tokens:
                logits = runner_output.logits[seq.seq_id]
                events.extend(self._verify(seq, item.num_draft_tokens, logits, now, scheduler_output.step_id, batch_size, spec_step))
                continue
            computed_before = seq.num_computed_tokens
            seq.num_computed_tokens += item.num_new_tokens
            self.block_manager.register_full_blocks(seq, computed_before)
            sampled = runner_output.sampled.get(seq.seq_id)
            if sampled is None:
                continue
            group = self.beam_groups.get(seq.request_id)
            if group is not None:
                if self._park_beam(group, seq, sampled):
                    ready_beam_groups.append(group)
                continue
            if seq.seq_id in self.pending_forks:
                self._fork(seq, self.pending_forks.pop(seq.seq_id))
            origin = "prefill" if seq.num_output_tokens == 0 else "decode"
            events.append(self._append_token(seq, sampled, now, scheduler_output.step_id, batch_size, origin))
        for group in ready_beam_groups:
            events.extend(self._expand_beams(group, now, scheduler_output.step_id, batch_size))
        return events

    # -- parallel sampling (n > 1) -------------------------------------------------------

    def _fork(self, parent: Sequence, num_children: int) -> None:
        """Start `num_children` more sequences of the parent's request, sharing its prompt KV.

        Called when the parent's prompt is computed, before its first token is appended.
        Each child shares the parent's blocks by reference count except the block
        holding the last prompt token. A child recomputes that token to sample its own
        first token, so writing into a shared block would change the parent's KV. That
        block is copied instead (copy-on-write, done at the fork). If no block is free
        for the copy, the child starts without blocks and recomputes its whole prompt
        (the prefix cache may still supply the full blocks).
        """
        size = self.block_manager.kv_block_size
        last_index = (parent.num_prompt_tokens - 1) // size
        shared = parent.block_table[:last_index]
        siblings = self.sequences[parent.request_id]
        for offset in range(1, num_children + 1):
            seed = parent.sampling_params.seed
            child = Sequence(
                request_id=parent.request_id,
                token_ids=list(parent.token_ids[: parent.num_prompt_tokens]),
                num_prompt_tokens=parent.num_prompt_tokens,
                sampling_params=parent.sampling_params,
                arrival_time=parent.arrival_time,
                priority=parent.priority,
                seq_index=parent.seq_index + offset,
                generator=make_generator(seed + offset if seed is not None else None),
                num_cached_prompt_tokens=parent.num_cached_prompt_tokens,
            )
            copy_id = self.block_manager.allocate_block()
            if copy_id is not None:
                for block_id in shared:
                    self.block_manager.ref_cached_block(block_id)
                self.kv_cache.import_blocks([copy_id], self.kv_cache.export_blocks([parent.block_table[last_index]]))
                child.block_table = list(shared) + [copy_id]
                child.num_computed_tokens = parent.num_prompt_tokens - 1
                self.num_forked_blocks_shared += len(shared)
            self.scheduler.add(child, enforce_queue_limit=False)
            siblings.append(child)
            self.outputs[child.seq_id] = OutputProcessor(self.tokenizer, child)

    # -- beam search (beam_search.py) -----------------------------------------------------

    def _park_beam(self, group: BeamGroup, seq: Sequence, sampled: SampledToken) -> bool:
        """Hold a beam that finished its step until its siblings have; True once all have."""
        # NOTE: a parked beam keeps its blocks and is not a preemption candidate, so a KV
        # pool too small for every beam of one request can stall that request.
        beam = next(beam for beam in group.beams if beam.seq is seq)
        beam.pending = sampled
        self.scheduler.running.remove(seq)
        return group.is_ready

    def _expand_beams(self, group: BeamGroup, now: float, step_id: int, batch_size: int) -> list[TokenEvent]:
        """Keep the best beam_width extensions, forking beams chosen more than once, and free the rest."""
        chosen = select_candidates(group)
        continuing: list[tuple[Beam, int, float]] = []
        new_beams: list[Beam] = []
        for beam, token_id, score in chosen:
            if any(beam is kept for kept, _, _ in continuing):
                new_beams.append(Beam(self._fork_beam(beam.seq, token_id), score))
            else:
                continuing.append((beam, token_id, score))
        # Forks above copied the parents' tokens, so parents may only now take their token.
        for beam, token_id, score in continuing:
            beam.seq.token_ids.append(token_id)
            new_beams.append(Beam(beam.seq, score))
        survivors = {beam.seq.seq_id for beam in new_beams}
        for beam in group.beams:
            if beam.seq.seq_id not in survivors:
                self.scheduler.remove(beam.seq)
                self.outputs.pop(beam.seq.seq_id, None)
        new_beams.sort(key=lambda beam: -beam.score)
        group.beams = new_beams
        self.sequences[group.request_id] = [beam.seq for beam in new_beams]

        best = new_beams[0].seq
        if best.num_output_tokens < group.params.max_tokens and best.num_tokens < self.facts.max_model_len:
            for beam in new_beams:
                self.scheduler.add(beam.seq, enforce_queue_limit=False)
            return []
        return self._finish_beams(group, now, step_id, batch_size)

    def _fork_beam(self, parent: Sequence, token_id: int) -> Sequence:
        """Copy a beam whose tokens are all computed, sharing its full blocks and copying its partial one."""
        child = Sequence(
            request_id=parent.request_id,
            token_ids=parent.token_ids + [token_id],
            num_prompt_tokens=parent.num_prompt_tokens,
            sampling_params=parent.sampling_params,
            arrival_time=parent.arrival_time,
            priority=parent.priority,
            num_cached_prompt_tokens=parent.num_cached_prompt_tokens,
        )
        size = self.block_manager.kv_block_size
        num_computed = parent.num_computed_tokens
        shared = parent.block_table[: num_computed // size]
        copy_id = None
        if num_computed % size:
            copy_id = self.block_manager.allocate_block()
            if copy_id is None:
                return child  # no block for the copy: the child recomputes from scratch
            source = parent.block_table[num_computed // size]
            self.kv_cache.import_blocks([copy_id], self.kv_cache.export_blocks([source]))
        for block_id in shared:
            self.block_manager.ref_cached_block(block_id)
        child.block_table = list(shared) + ([copy_id] if copy_id is not None else [])
        child.num_computed_tokens = num_computed
        self.num_forked_blocks_shared += len(shared)
        return child

    def _finish_beams(self, group: BeamGroup, now: float, step_id: int, batch_size: int) -> list[TokenEvent]:
        """Stream the best beam's tokens (cut at its first stop) and free every beam."""
        best = group.beams[0].seq
        params = group.params
        output = OutputProcessor(self.tokenizer, best)
        output_token_ids = best.output_token_ids
        events = []
        for index, token_id in enumerate(output_token_ids):
            text, stop_string_hit = output.add_token(token_id)
            is_eos = token_id in self.facts.eos_token_ids and not params.ignore_eos
            finish_reason = None
            if stop_string_hit or is_eos or token_id in params.stop_token_ids:
                finish_reason = "stop"
            elif index == len(output_token_ids) - 1:
                finish_reason = "length"
            if finish_reason is not None and not stop_string_hit:
                text += output.finish()

            event = self._beam_event(best, token_id, text, index, finish_reason, now, step_id, batch_size)
            events.append(event)
            if finish_reason is not None:
                break

        for beam in group.beams:
            self.scheduler.remove(beam.seq)
            beam.seq.status = SequenceStatus.FINISHED_STOPPED
        self.beam_groups.pop(group.request_id, None)
        # The request's first sequence keeps an output processor even when its beam was dropped.
        first_seqs = self.sequences.pop(group.request_id, None) or []
        for seq_id in {beam.seq.seq_id for beam in group.beams} | {seq.seq_id for seq in first_seqs} | {best.seq_id}:
            self.outputs.pop(seq_id, None)
        return events

    @staticmethod
    def _beam_event(
        seq: Sequence, token_id: int, text: str, index: int, finish_reason: str | None, now: float, step_id: int, batch_size: int
    ) -> TokenEvent:
        return TokenEvent(
            request_id=seq.request_id,
            seq_index=0,
            token_id=token_id,
            text=text,
            logprob=None,
            top_logprobs=None,
            time_since_arrival_ms=(now - seq.arrival_time) * 1000,
            step_id=step_id,
            batch_size=batch_size,
            origin="beam",
            index=index,
            finish_reason=finish_reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_prompt_tokens=seq.num_cached_prompt_tokens,
        )

    # -- speculative decoding -----------------------------------------------------------

    def _propose_drafts(self) -> SpecStepStats:
        """Append drafts to the running decode sequences before scheduling (spec_decode/)."""
        started = time.perf_counter()
        spec_config = self.config.speculative
        seqs, limits = drafting_candidates(self.scheduler.running, spec_config.num_speculative_tokens, self.facts.max_model_len)
        proposals = self.drafter.propose(seqs, limits) if seqs else []
        for seq, draft_token_ids in zip(seqs, proposals):
            if draft_token_ids:
                seq.add_draft_tokens(draft_token_ids, None)
        return SpecStepStats(
            step_id=self.scheduler.step_id + 1,
            method=spec_config.method,
            num_proposing_seqs=len(seqs),
            totals=SpecDecodeStats(spec_config.num_speculative_tokens),
            propose_ms=(time.perf_counter() - started) * 1000,
        )

    def _verify(
        self,
        seq: Sequence,
        num_draft_tokens: int,
        logits: torch.Tensor,
        now: float,
        step_id: int,
        batch_size: int,
        spec_step: SpecStepStats | None,
    ) -> list[TokenEvent]:
        """Accept a prefix of the drafts, emit it plus one recovered or bonus token, roll back the rest.

        Before the step the sequence had n verified tokens with n - 1 computed, and the
        step computed positions n - 1 .. n - 1 + k. After accepting a drafts, the KV of
        positions up to n - 1 + a is valid, so `num_computed_tokens` becomes n + a, one
        less than the new length, as after any decode step. Slots past the new length are
        released, and blocks are hashed for the prefix cache only up to the accepted
        tokens.
        """
        started = time.perf_counter()
        draft_probs = seq.draft_probs
        draft_token_ids = seq.drop_draft_tokens()
        computed_before = seq.num_computed_tokens
        verification = verify_drafts(
            logits, draft_token_ids, draft_probs, seq.token_ids, seq.sampling_params, seq.generator
        )
        if seq.spec_stats is None:
            seq.spec_stats = SpecDecodeStats(self.config.speculative.num_speculative_tokens)
        num_emitted = len(verification.tokens)
        for stats in (seq.spec_stats, self.spec_stats, spec_step.totals if spec_step is not None else None):
            if stats is not None:
                stats.record(num_draft_tokens, verification.num_accepted, num_emitted)

        events = []
        for sampled, origin in zip(verification.tokens, verification.origins):
            events.append(self._append_token(seq, sampled, now, step_id, batch_size, origin))
            if seq.status.is_finished:
                break
        if not seq.status.is_finished:
            seq.num_computed_tokens = computed_before + verification.num_accepted + 1
            self.block_manager.trim(seq, seq.num_tokens)
            self.block_manager.register_full_blocks(seq, computed_before)
        if spec_step is not None:
            spec_step.verify_ms += (time.perf_counter() - started) * 1000
        return events

    def _append_token(
        self, seq: Sequence, sampled: SampledToken, now: float, step_id: int, batch_size: int, origin: str
    ) -> TokenEvent:
        seq.token_ids.append(sampled.token_id)
        seq.token_times.append(now)
        if seq.first_token_time is None:
            seq.first_token_time = now
        params = seq.sampling_params
        output = self.outputs[seq.seq_id]
        text, stop_string_hit = output.add_token(sampled.token_id)

        status = None
        is_eos = sampled.token_id in self.facts.eos_token_ids and not params.ignore_eos
        if stop_string_hit or is_eos or sampled.token_id in params.stop_token_ids:
            status = SequenceStatus.FINISHED_STOPPED
        elif seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.facts.max_model_len:
            status = SequenceStatus.FINISHED_LENGTH
        if status is not None and not stop_string_hit:
            text += output.finish()

        top = None
        if sampled.top_logprobs is not None:
            top = [(tid, self.tokenizer.decode([tid]), lp) for tid, lp in sampled.top_logprobs]
        event = TokenEvent(
            request_id=seq.request_id,
            seq_index=seq.seq_index,
            token_id=sampled.token_id,
            text=text,
            logprob=sampled.logprob,
            top_logprobs=top,
            time_since_arrival_ms=(now - seq.arrival_time) * 1000,
            step_id=step_id,
            batch_size=batch_size,
            origin=origin,
            index=seq.num_output_tokens - 1,
            finish_reason=status.finish_reason if status is not None else None,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_prompt_tokens=seq.num_cached_prompt_tokens,
        )
        if status is not None:
            event.spec_stats = seq.spec_stats
            self._finish(seq, status)
        elif seq.prefill_only:
            # Keep the blocks for export; the decode worker continues from here.
            self.scheduler.running.remove(seq)
            seq.status = SequenceStatus.PREFILLED
            self.prefilled[seq.request_id] = seq
        return event

    def _finish(self, seq: Sequence, status: SequenceStatus) -> None:
        seq.status = status
        self.scheduler.remove(seq)
        if self.drafter is not None:
            self.drafter.release(seq)
        siblings = self.sequences.get(seq.request_id, [])
        if seq in siblings:
            siblings.remove(seq)
        if not siblings:
            self.sequences.pop(seq.request_id, None)
        self.outputs.pop(seq.seq_id, None)

    # -- disaggregation -----------------------------------------------------------------

    def export_sequence(self, request_id: str) -> KVHandoff:
        """Pack a PREFILLED sequence and its KV blocks, then release it from this engine.

        Its full blocks stay in this engine's prefix cache after release.
        """
        t0 = time.perf_counter()
        seq = self.prefilled.pop(request_id)
        # The last sampled token has no K/V yet, so only the prompt's blocks travel.
        num_blocks = seq.num_blocks_for(seq.num_computed_tokens, self.block_manager.kv_block_size)
        block_ids = seq.block_table[:num_blocks]
        kv = self.kv_cache.export_blocks(block_ids)
        hashes = [self.block_manager.blocks[b].block_hash for b in block_ids]
        generator_state = seq.generator.get_state() if seq.generator is not None else None
        handoff = KVHandoff(
            request_id=seq.request_id,
            seq_index=seq.seq_index,
            token_ids=list(seq.token_ids),
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_prompt_tokens=seq.num_cached_prompt_tokens,
            sampling_params=seq.sampling_params,
            arrival_time=seq.arrival_time,
            priority=seq.priority,
            generator_state=generator_state,
            first_token_time=seq.first_token_time,
            block_hashes=hashes,
            kv=kv,
            export_ms=(time.perf_counter() - t0) * 1000,
            created_at=time.time(),
        )
        self.block_manager.free(seq)
        self.sequences.pop(seq.request_id, None)
        self.outputs.pop(seq.seq_id, None)
        seq.status = SequenceStatus.FINISHED_STOPPED
        return handoff

    def import_sequence(self, handoff: KVHandoff) -> HandoffStats:
        """Write a handoff's KV blocks into this engine's pool and queue the sequence to decode.

        Raises MemoryError when the blocks do not fit even after evicting the prefix cache.
        """
        t0 = time.perf_counter()
        transfer_ms = max(0.0, (time.time() - handoff.created_at) * 1000)
        if handoff.request_id in self.sequences:
            raise ValueError(f"request id {handoff.request_id!r} is already in the engine")
        seq = Sequence(
            request_id=handoff.request_id,
            token_ids=list(handoff.token_ids),
            num_prompt_tokens=handoff.num_prompt_tokens,
            sampling_params=handoff.sampling_params,
            arrival_time=handoff.arrival_time,
            priority=handoff.priority,
            seq_index=handoff.seq_index,
            generator=make_generator(0) if handoff.generator_state is not None else None,
            num_cached_prompt_tokens=handoff.num_cached_prompt_tokens,
            first_token_time=handoff.first_token_time,
        )
        if seq.generator is not None:
            seq.generator.set_state(handoff.generator_state)

        size = self.block_manager.kv_block_size
        num_blocks = handoff.kv.shape[2]
        reused = 0
        to_import: list[tuple[int, int]] = []  # (position in handoff, local block id)
        for index in range(num_blocks):
            block_hash = handoff.block_hashes[index]
            tokens = tuple(handoff.token_ids[index * size : (index + 1) * size])
            local = None
            if block_hash is not None and self.block_manager.enable_prefix_caching and reused == index:
                local = self.block_manager.lookup_cached_block(block_hash, tokens)
            if local is not None:
                self.block_manager.ref_cached_block(local)
                seq.block_table.append(local)
                reused += 1
                continue
            block_id = self.block_manager.allocate_block()
            if block_id is None:
                self.block_manager.free(seq)
                raise MemoryError(f"no free KV blocks to import request {handoff.request_id}")
            seq.block_table.append(block_id)
            to_import.append((index, block_id))

        if to_import:
            positions = torch.tensor([p for p, _ in to_import], dtype=torch.long)
            self.kv_cache.import_blocks([b for _, b in to_import], handoff.kv.index_select(2, positions))
        self.block_manager.register_imported_blocks(
            [b for _, b in to_import],
            [handoff.block_hashes[p] for p, _ in to_import],
            [tuple(handoff.token_ids[p * size : (p + 1) * size]) for p, _ in to_import],
        )
        seq.num_computed_tokens = handoff.num_prompt_tokens
        # Admission control happens where a request enters (the prefill worker), before
        # the client sees a token. An imported sequence has already streamed its first
        # token, so rejecting it here would cut a response mid-stream.
        self.scheduler.add(seq, enforce_queue_limit=False)
        self.sequences[seq.request_id] = [seq]
        output = OutputProcessor(self.tokenizer, seq)
        output.replay(seq.output_token_ids)
        self.outputs[seq.seq_id] = output
        return HandoffStats(
            num_bytes=handoff.num_bytes,
            num_blocks=num_blocks,
            export_ms=handoff.export_ms,
            transfer_ms=transfer_ms,
            import_ms=(time.perf_counter() - t0) * 1000,
            reused_blocks=reused,
        )

    # -- introspection ------------------------------------------------------------------

    def live_sequences(self) -> list[Sequence]:
        return [seq for seqs in self.sequences.values() for seq in seqs]

    def check_block_accounting(self) -> None:
        self.block_manager.check_invariants(self.live_sequences())

    def kv_state(self) -> dict:
        state = self.block_manager.snapshot()
        state["sequences"] = [
            {
                "request_id": s.request_id,
                "status": s.status.name.lower(),
                "num_tokens": s.num_tokens,
                "num_computed_tokens": s.num_computed_tokens,
                "block_table": list(s.block_table),
            }
            for s in self.live_sequences()
        ]
        state["saved_kv_bytes"] = self.block_manager.num_saved_blocks * self.kv_cache.spec.bytes_per_block
        state["num_waiting"] = len(self.scheduler.waiting)
        state["num_running"] = len(self.scheduler.running)
        return state

    def spec_state(self) -> dict:
        """Speculative decoding setting and acceptance statistics, as JSON-ready values."""
        spec_config = self.config.speculative
        return {
            "method": spec_config.method,
            "num_speculative_tokens": spec_config.num_speculative_tokens if spec_config.enabled else 0,
            "totals": self.spec_stats.to_dict(),
            "last_step": self.last_spec_step.to_dict() if self.last_spec_step is not None else None,
        }

    # -- convenience for tests and benchmarks -------------------------------------------

    def generate(self, prompts: list[list[int]], sampling_params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        """Run prompts to completion as one continuous batch; return each one's generated token ids."""
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        ids = [f"generate-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
        for request_id, prompt, p in zip(ids, prompts, params):
            self.add_request(request_id, prompt, p)
        outputs: dict[str, list[int]] = {request_id: [] for request_id in ids}
        while self.has_unfinished():
            for event in self.step():
                outputs[event.request_id].append(event.token_id)
        return [outputs[request_id] for request_id in ids]
