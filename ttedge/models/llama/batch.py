"""How one forward pass's tokens map onto sequences, positions and KV-cache slots.

A forward takes a flat list of new tokens from several sequences — a prefill chunk, one decode
token, or a draft to verify — each sequence contributing a contiguous run. ``BatchLayout`` is built
once per step on the host and shared by every layer, so per-layer work is only tensor indexing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ttedge.runtime.kv_cache import BLOCK_SIZE


@dataclass(frozen=True)
class SequenceChunk:
    """``num_tokens`` new tokens of one sequence, starting at position ``start``."""

    start: int
    num_tokens: int
    block_table: list[int]
    # Logits for every new token (verification of drafts, prompt logprobs) or only the last one.
    all_logits: bool = False

    @property
    def end(self) -> int:
        return self.start + self.num_tokens


@dataclass(frozen=True)
class BatchLayout:
    positions: torch.Tensor  # [T] position of each new token
    token_sequence: torch.Tensor  # [T] index of each new token's sequence in the batch
    slot_mapping: torch.Tensor  # [T] KV slot each new token writes
    block_tables: torch.Tensor  # [B, ceil(C / BLOCK_SIZE)] KV blocks each sequence reads, padded with block 0
    context_len: int  # C: keys the longest sequence attends to after this step's writes
    attn_mask: torch.Tensor | None  # [B, 1, Q, C] True where a query may attend; None = attend to all
    query_index: torch.Tensor | None  # [B, Q] rows of the flat tokens per sequence; None when Q == 1
    output_index: torch.Tensor | None  # [T] row of each token in the padded [B * Q] output
    logits_indices: torch.Tensor  # [N] rows of the flat tokens whose logits are wanted
    max_query_len: int

    @property
    def num_sequences(self) -> int:
        return int(self.block_tables.shape[0])

    @classmethod
    def build(cls, chunks: list[SequenceChunk]) -> BatchLayout:
        if not chunks:
            raise ValueError("a forward needs at least one sequence")
        for chunk in chunks:
            if chunk.num_tokens <= 0:
                raise ValueError(f"a sequence chunk must add at least one token, got {chunk.num_tokens}")
            if len(chunk.block_table) * BLOCK_SIZE < chunk.end:
                raise ValueError(
                    f"block table of {len(chunk.block_table)} blocks cannot hold {chunk.end} tokens"
                )
        starts = torch.tensor([c.start for c in chunks])
        lengths = torch.tensor([c.num_tokens for c in chunks])
        ends = starts + lengths
        max_q = int(lengths.max())
        max_ctx = int(ends.max())
        max_blocks = -(-max_ctx // BLOCK_SIZE)
        padded_tables = []
        for chunk in chunks:
            used = chunk.block_table[:max_blocks]
            padded_tables.append(used + [0] * (max_blocks - len(used)))
        tables = torch.tensor(padded_tables, dtype=torch.long)

        first_row = torch.cumsum(lengths, 0) - lengths
        token_seq = torch.repeat_interleave(torch.arange(len(chunks)), lengths)
        token_offset = torch.arange(int(lengths.sum())) - first_row[token_seq]
        positions = starts[token_seq] + token_offset
        slot_mapping = tables[token_seq, positions // BLOCK_SIZE] * BLOCK_SIZE + positions % BLOCK_SIZE

        offsets = torch.arange(max_ctx)
        query_pos = starts[:, None] + torch.arange(max_q)[None, :]
        attn_mask: torch.Tensor | None = None
        if len(chunks) > 1 or max_q > 1:
            # Padded query rows (beyond a sequence's length) still see key 0, so softmax never
            # divides by zero; their outputs are dropped.
            mask = (offsets[None, None, :] <= query_pos[:, :, None]) & (
                offsets[None, None, :] < ends[:, None, None]
            )
            attn_mask = mask[:, None]

        query_index = output_index = None
        if max_q > 1:
            query_index = torch.where(
                torch.arange(max_q)[None, :] < lengths[:, None],
                first_row[:, None] + torch.arange(max_q)[None, :],
                first_row[:, None],
            )
            output_index = token_seq * max_q + token_offset

        wanted: list[int] = []
        for chunk, row in zip(chunks, first_row.tolist(), strict=True):
            if chunk.all_logits:
                wanted.extend(range(row, row + chunk.num_tokens))
            else:
                wanted.append(row + chunk.num_tokens - 1)
        return cls(
            positions=positions,
            token_sequence=token_seq,
            slot_mapping=slot_mapping,
            block_tables=tables,
            context_len=max_ctx,
            attn_mask=attn_mask,
            query_index=query_index,
            output_index=output_index,
            logits_indices=torch.tensor(wanted, dtype=torch.long),
            max_query_len=max_q,
        )
