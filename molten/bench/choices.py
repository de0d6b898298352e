"""Names `molten bench` accepts for its workloads, doors and peers (standard library only, for the CLI)."""

WORKLOAD_NAMES = ("single", "concurrent", "shared-prefix", "long-context", "disagg")
DOOR_NAMES = ("engine", "handle", "http")
PEER_NAMES = ("transformers", "llamacpp")
DTYPE_NAMES = ("float32", "bfloat16", "float16")
QUANTIZED_NAMES = ("int8", "int4")
"""Weight-only integer precisions (float32 activations) the single workload also runs the engine door in."""
