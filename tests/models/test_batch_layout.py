import pytest
import torch

from ttedge.models.llama.batch import BatchLayout, SequenceChunk
from ttedge.runtime.kv_cache import BLOCK_SIZE


def test_decode_batch_needs_no_query_padding():
    layout = BatchLayout.build(
        [SequenceChunk(start=5, num_tokens=1, block_table=[3]), SequenceChunk(40, 1, [0, 7])]
    )
    assert layout.query_index is None and layout.output_index is None
    assert layout.positions.tolist() == [5, 40]
    assert layout.slot_mapping.tolist() == [3 * BLOCK_SIZE + 5, 7 * BLOCK_SIZE + 8]
    assert layout.logits_indices.tolist() == [0, 1]
    mask = layout.attn_mask
    assert mask is not None
    assert mask[0, 0, 0].sum() == 6 and mask[1, 0, 0].sum() == 41


def test_mixed_prefill_and_decode_are_causal_per_sequence():
    chunks = [
        SequenceChunk(0, 3, [2]),
        SequenceChunk(10, 1, [4]),
        SequenceChunk(32, 2, [1, 5], all_logits=True),
    ]
    layout = BatchLayout.build(chunks)
    assert layout.positions.tolist() == [0, 1, 2, 10, 32, 33]
    assert layout.max_query_len == 3
    assert layout.logits_indices.tolist() == [2, 3, 4, 5]
    mask = layout.attn_mask
    assert mask is not None
    # Prompt token i of sequence 0 sees keys 0..i only.
    assert [int(mask[0, 0, i].sum()) for i in range(3)] == [1, 2, 3]
    # The third sequence's second new token (position 33) sees 34 keys, in blocks 1 then 5.
    assert int(mask[2, 0, 1].sum()) == 34
    assert layout.slot_mapping[5].item() == 5 * BLOCK_SIZE + 1
    assert layout.block_tables[2].tolist() == [1, 5] and layout.context_len == 34
    # Scattering the padded attention output back recovers the flat token order.
    assert layout.query_index is not None and layout.output_index is not None
    flat = torch.arange(6)
    padded = flat[layout.query_index].reshape(-1)
    assert padded[layout.output_index].tolist() == flat.tolist()


def test_single_sequence_decode_has_no_mask():
    layout = BatchLayout.build([SequenceChunk(7, 1, [0])])
    assert layout.attn_mask is None


def test_block_table_too_short_is_refused():
    with pytest.raises(ValueError, match="cannot hold 33 tokens"):
        BatchLayout.build([SequenceChunk(31, 2, [0])])
