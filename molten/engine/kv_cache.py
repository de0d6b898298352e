"""The paged KV pool: per-layer K and V tensors indexed by slot, plus block export and import.

Layout, one tensor for the whole pool:

    kv[layer, 0 | 1, slot, kv_head, head_dim]     0 = K, 1 = V
    slot = block_id * kv_block_size + offset

Slots are flat so that writing new tokens is one `index_copy_` with the step's slot
mapping and reading a sequence's context is one gather with its slot list.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    kv_block_size: int

    @property
    def bytes_per_token(self) -> int:
        element_size = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element_size

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.kv_block_size


class PagedKVCache:
    def __init__(self, spec: KVCacheSpec, num_blocks: int):
        self.spec = spec
        self.num_blocks = num_blocks
        self.kv = torch.zeros(
            spec.num_layers, 2, num_blocks * spec.kv_block_size, spec.num_kv_heads, spec.head_dim, dtype=spec.dtype
        )

    @property
    def num_bytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def layer(self, layer_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kv[layer_index, 0], self.kv[layer_index, 1]

    def layer_blocks(self, layer_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer viewed as [blocks, kv_block_size, kv_heads, head_dim]."""
        s = self.spec
        shape = (self.num_blocks, s.kv_block_size, s.num_kv_heads, s.head_dim)
        return self.kv[layer_index, 0].view(shape), self.kv[layer_index, 1].view(shape)

    def _block_view(self) -> torch.Tensor:
        # [layers, 2, blocks, kv_block_size, kv_heads, head_dim]
        s = self.spec
        return self.kv.view(s.num_layers, 2, self.num_blocks, s.kv_block_size, s.num_kv_heads, s.head_dim)

    def export_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """Copy out whole blocks: [layers, 2, len(block_ids), kv_block_size, kv_heads, head_dim]."""
        index = torch.tensor(block_ids, dtype=torch.long)
        return self._block_view().index_select(2, index).contiguous()

    def import_blocks(self, block_ids: list[int], data: torch.Tensor) -> None:
        """Write blocks exported by `export_blocks` (possibly from another process) into `block_ids`."""
        if data.shape[2] != len(block_ids):
            raise ValueError(f"import of {data.shape[2]} blocks into {len(block_ids)} block ids")
        index = torch.tensor(block_ids, dtype=torch.long)
        self._block_view().index_copy_(2, index, data.to(self.spec.dtype))


def num_blocks_for_memory(spec: KVCacheSpec, memory_mib: int) -> int:
    return max(2, (memory_mib * 1024 * 1024) // spec.bytes_per_block)
