"""The CPU backend's decode attention, piece by piece, against the alternatives it replaced.

At SmolLM2-135M's shape (3 KV heads, 9 query heads, head_dim 64, bfloat16) for a batch of sequences
decoding one token each, with block tables scattered over a large cache:

- gathering the context: token by token (one index per slot) against block by block (one
  ``index_select`` of 4 KB rows for K and V together, as ``CpuKVCache.read`` does);
- attention: SDPA with ``enable_gqa`` against the query heads folded into each KV head's queries (as
  ``LlamaModel._attention`` does in decode steps).

Both pairs run round-robin in one process; the fastest of the repeats is reported, in microseconds per
layer.

    python scripts/bench_attention.py [--shapes 1x100 32x100 32x500]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

KV_HEADS, HEADS, HEAD_DIM, BLOCK = 3, 9, 64, 32
CACHE_BLOCKS = 8000


def fastest_us(jobs: dict[str, Callable[[], object]], repeats: int, calls: int) -> dict[str, float]:
    best = dict.fromkeys(jobs, float("inf"))
    for _ in range(repeats):
        for name, job in jobs.items():
            started = time.perf_counter()
            for _ in range(calls):
                job()
            best[name] = min(best[name], (time.perf_counter() - started) / calls * 1e6)
    return best


def measure(batch: int, context: int, repeats: int, calls: int) -> dict[str, float]:
    generator = torch.Generator().manual_seed(0)
    blocks_per_seq = -(-context // BLOCK)
    cache = torch.randn(2, KV_HEADS, CACHE_BLOCKS, BLOCK, HEAD_DIM, generator=generator).bfloat16()
    tables = torch.randperm(CACHE_BLOCKS, generator=generator)[: batch * blocks_per_seq].view(batch, -1)

    offsets = torch.arange(context)
    slots = tables[:, offsets // BLOCK] * BLOCK + offsets % BLOCK  # [batch, context]
    by_slot = cache.view(2, KV_HEADS, -1, HEAD_DIM)
    rows = ((torch.arange(2 * KV_HEADS)[:, None, None] * CACHE_BLOCKS) + tables[None]).flatten()
    by_block = cache.view(-1, BLOCK * HEAD_DIM)

    keys = by_slot[0][:, slots].transpose(0, 1)  # [batch, kv_heads, context, head_dim]
    values = by_slot[1][:, slots].transpose(0, 1)
    queries = torch.randn(batch, HEADS, HEAD_DIM, generator=generator).bfloat16()
    mask = None if batch == 1 else torch.ones(batch, 1, 1, context, dtype=torch.bool)
    group = HEADS // KV_HEADS

    jobs = {
        "gather by token": lambda: (by_slot[0][:, slots], by_slot[1][:, slots]),
        "gather by block": lambda: by_block.index_select(0, rows),
        "sdpa enable_gqa": lambda: F.scaled_dot_product_attention(
            queries.unsqueeze(2), keys, values, attn_mask=mask, enable_gqa=True
        ),
        "sdpa folded": lambda: F.scaled_dot_product_attention(
            queries.view(batch, KV_HEADS, group, HEAD_DIM), keys, values, attn_mask=mask
        ),
    }
    return fastest_us(jobs, repeats, calls)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", nargs="+", default=["1x100", "8x300", "32x100", "32x500"], help="BxC")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(
        f"torch {torch.__version__}, {args.threads} threads; "
        f"microseconds per layer, fastest of {args.repeats}"
    )
    print(
        "| sequences x context | gather by token | gather by block | ratio "
        "| SDPA enable_gqa | SDPA folded | ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        batch, context = (int(n) for n in shape.split("x"))
        us = measure(batch, context, args.repeats, args.calls)
        print(
            f"| {batch} x {context} | {us['gather by token']:.0f} | {us['gather by block']:.0f} | "
            f"{us['gather by token'] / us['gather by block']:.1f}x | {us['sdpa enable_gqa']:.0f} | "
            f"{us['sdpa folded']:.0f} | {us['sdpa enable_gqa'] / us['sdpa folded']:.1f}x |"
        )


if __name__ == "__main__":
    main()
