"""The paged KV cache tensors and the forward's reusable scratch buffers.

KV cache contract (docs/ARCHITECTURE.md): token at position ``p`` of a sequence lives in
slot ``block_table[p // B] * B + p % B`` of the flat ``[num_blocks * B, n_head, head_dim]``
per-layer tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def kv_layout(config: object) -> tuple[int, int, int]:
    """What decides a model's KV tensors' shapes: layers, heads, head size."""
    n_layer, n_head, n_embd = (int(getattr(config, k)) for k in ("n_layer", "n_head", "n_embd"))
    return n_layer, n_head, n_embd // n_head


@dataclass
class KVCache:
    """Per layer one key and one value tensor of shape [num_blocks * block_size, H, hd]."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    block_size: int

    @classmethod
    def allocate(
        cls,
        config,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> KVCache:
        n_head = config.n_head
        head_dim = config.n_embd // n_head
        shape = (num_blocks * block_size, n_head, head_dim)
        # zeros, not empty: attention gathers whole blocks, so the unused tail of a sequence's
        # last block is read (and masked, weight exactly 0); it must hold finite values,
        # since 0 * NaN would still be NaN. Written slots only ever hold finite k/v.
        keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        return cls(keys, values, block_size)

    @staticmethod
    def block_bytes(config, block_size: int, dtype: torch.dtype) -> int:
        """Bytes one block takes over all layers (keys + values), to size the pool."""
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * config.n_layer * block_size * config.n_embd * elem

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def num_blocks(self) -> int:
        return self.keys[0].shape[0] // self.block_size

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype

    @torch.inference_mode()
    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks src -> dst in every layer (copy-on-write before a step)."""
        if not pairs:
            return
        src = torch.tensor([s for s, _ in pairs], dtype=torch.long, device=self.keys[0].device)
        dst = torch.tensor([d for _, d in pairs], dtype=torch.long, device=self.keys[0].device)
        b = self.block_size
        for t in (*self.keys, *self.values):
            blocks = t.view(-1, b, *t.shape[1:])  # [num_blocks, B, H, hd] view, no copy
            # index_select materializes the sources first, so overlapping pairs stay correct.
            blocks.index_copy_(0, dst, blocks.index_select(0, src))


class Workspace:
    """Grow-only scratch buffers reused across layers and steps.

    A fresh multi-MB tensor per layer costs page faults (mmap'd allocations) that on the
    2-core CPU are as slow as the copy itself; a reused buffer stays mapped.
    """

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}

    def get(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        numel = 1
        for s in shape:
            numel *= s
        buf = self._bufs.get(name)
        if buf is None or buf.dtype != dtype or buf.device != device or buf.numel() < numel:
            buf = torch.empty(max(numel, 1), dtype=dtype, device=device)
            self._bufs[name] = buf
        return buf[:numel].view(shape)
