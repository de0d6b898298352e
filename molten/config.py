"""Engine settings: one validated dataclass per concern, built once at the entry point.

Facts discovered at start-up (how many KV blocks fit, the EOS ids) live in
`EngineFacts`, never written back into these objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """An invalid setting. `field` names the setting to change."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass
class CacheConfig:
    kv_block_size: int = 16
    """Token slots per KV block (the KV page size)."""
    num_kv_blocks: int | None = None
    """Blocks in the paged KV pool; None sizes the pool from `kv_cache_memory_mib`."""
    kv_cache_memory_mib: int = 512
    """Memory for the KV pool in MiB, used when `num_kv_blocks` is None."""
    enable_prefix_caching: bool = True
    """Share full KV blocks between requests whose prompts start with the same tokens."""

    def validate(self) -> None:
        if self.kv_block_size < 1 or self.kv_block_size & (self.kv_block_size - 1):
            raise ConfigError("kv_block_size", f"kv_block_size must be a power of two, got {self.kv_block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise ConfigError("num_kv_blocks", f"num_kv_blocks must be at least 2, got {self.num_kv_blocks}")
        if self.kv_cache_memory_mib < 1:
            raise ConfigError("kv_cache_memory_mib", "kv_cache_memory_mib must be at least 1")


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    """Sequences that may run in one step (the decode batch limit)."""
    max_num_batched_tokens: int = 512
    """Token budget of one step: decode tokens plus prefill-chunk tokens."""
    enable_chunked_prefill: bool = True
    """Split long prompts across steps so running decodes are never stalled by one prefill."""
    max_num_waiting: int = 256
    """Queued requests past which new ones are rejected (HTTP 429)."""
    policy: str = "fcfs"
    """`fcfs` (arrival order) or `priority` (lower `priority` value first, then arrival)."""

    def validate(self, max_model_len: int) -> None:
        if self.max_num_seqs < 1:
            raise ConfigError("max_num_seqs", "max_num_seqs must be at least 1")
        if self.max_num_batched_tokens < 1:
            raise ConfigError("max_num_batched_tokens", "max_num_batched_tokens must be at least 1")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < max_model_len:
            raise ConfigError(
                "max_num_batched_tokens",
                f"without chunked prefill a whole prompt must fit one step: set max_num_batched_tokens >= "
                f"max_model_len ({max_model_len}) or enable chunked prefill",
            )
        if self.policy not in ("fcfs", "priority"):
            raise ConfigError("policy", f"policy must be 'fcfs' or 'priority', got {self.policy!r}")


SPECULATIVE_METHODS = ("none", "ngram", "draft")


@dataclass
class SpeculativeConfig:
    """Speculative decoding: propose draft tokens cheaply, verify them in one target step."""

    method: str = "none"
    """`none` (off), `ngram` (prompt lookup: copy what followed an earlier match of the
    last tokens) or `draft` (a smaller draft model, or the target's own first layers)."""
    num_speculative_tokens: int = 4
    """Draft tokens proposed per sequence per step (k). Each step emits 1 to k + 1 tokens."""
    ngram_min: int = 1
    """Shortest suffix (in tokens) the n-gram drafter tries to match in the context."""
    ngram_max: int = 4
    """Longest suffix (in tokens) the n-gram drafter tries first."""
    draft_model: str | None = None
    """Draft model id for `method="draft"` (for example `smollm2-135m-instruct:int4`). It
    must share the target's tokenizer. None uses a self-draft of the target's first layers."""
    draft_num_layers: int = 4
    """Decoder layers of the target that the self-draft runs (used when `draft_model` is None)."""

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    def validate(self) -> None:
        if self.method not in SPECULATIVE_METHODS:
            raise ConfigError(
                "method", f"speculative method must be one of {', '.join(SPECULATIVE_METHODS)}, got {self.method!r}"
            )
        if isinstance(self.num_speculative_tokens, bool) or not 1 <= self.num_speculative_tokens <= 16:
            raise ConfigError(
                "num_speculative_tokens",
                f"num_speculative_tokens must be an integer in [1, 16], got {self.num_speculative_tokens!r}",
            )
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ConfigError(
                "ngram_min", f"need 1 <= ngram_min <= ngram_max, got ngram_min={self.ngram_min}, ngram_max={self.ngram_max}"
            )
        if self.draft_num_layers < 1:
            raise ConfigError("draft_num_layers", f"draft_num_layers must be at least 1, got {self.draft_num_layers}")


@dataclass
class EngineConfig:
    model: str = "smollm2-135m-instruct"
    """Catalog name, Hugging Face id, local directory or .gguf path."""
    dtype: str = "float32"
    """Weight and activation dtype: float32, bfloat16 or float16."""
    max_model_len: int | None = None
    """Context window in tokens; None takes the model's own (capped at 8192)."""
    num_threads: int | None = None
    """Torch intra-op threads for this engine's process; None leaves torch's default."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    log_step_stats: bool = False
    """Log one debug line per engine step."""
    step_history: int = 1024
    """Engine steps whose cost records (tokens, time, bytes, FLOPs) are kept for the step trace; 0 keeps none."""

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError("dtype", f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError("max_model_len", "max_model_len must be at least 2")
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError("num_threads", "num_threads must be at least 1")
        if self.step_history < 0:
            raise ConfigError("step_history", f"step_history must be 0 (off) or more, got {self.step_history}")
        self.cache.validate()
        self.speculative.validate()


@dataclass(frozen=True)
class EngineFacts:
    """Facts the engine found at start-up."""

    model_id: str
    max_model_len: int
    num_kv_blocks: int
    kv_block_size: int
    kv_bytes_per_token: int
    eos_token_ids: frozenset[int]
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
