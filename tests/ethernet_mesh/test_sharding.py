"""Tensor-parallel sharding plans: splits, KV-head replication, refusals, collective byte counts, and
the model cards' deployments."""

from __future__ import annotations

import dataclasses
import math

import pytest

from ttedge import model_zoo
from ttedge.config import ModelConfig
from ttedge.ethernet_mesh.collectives import Collective
from ttedge.ethernet_mesh.sharding import ShardingError, Split, plan_tensor_parallel
from ttedge.ethernet_mesh.topology import get_mesh


def _card_config(card_id: str) -> ModelConfig:
    card = model_zoo.find_card(card_id)
    assert card is not None
    return card.config


SMOLLM2_135M = _card_config("smollm2-135m-instruct")  # 9 query heads, 3 KV heads, MLP 1536
LLAMA_8B = _card_config("llama-3.1-8b-instruct")  # 32 query heads, 8 KV heads


def test_smollm2_135m_splits_over_three() -> None:
    plan = plan_tensor_parallel(SMOLLM2_135M, 3)
    assert (plan.query_heads_per_device, plan.kv_heads_per_device, plan.kv_head_copies) == (3, 1, 1)
    assert plan.weight("q").per_device_shape == (3 * 64, 576)
    assert plan.weight("k").per_device_shape == (64, 576)
    assert plan.weight("down").per_device_shape == (576, 512)
    assert plan.weight("lm_head").per_device_shape == (49152 // 3, 576)


@pytest.mark.parametrize(
    ("devices", "reasons"),
    [
        (2, ["9 query heads do not divide over 2 devices", "3 KV heads do not divide over 2 devices"]),
        (4, ["9 query heads do not divide over 4", "3 KV heads cannot be replicated evenly over 4 devices"]),
        (9, ["MLP width 1536 does not divide over 9 devices"]),
        (0, ["TP degree must be at least 1"]),
    ],
)
def test_smollm2_135m_refuses_splits_that_do_not_divide(devices: int, reasons: list[str]) -> None:
    with pytest.raises(ShardingError) as raised:
        plan_tensor_parallel(SMOLLM2_135M, devices)
    message = str(raised.value)
    assert message.startswith(SMOLLM2_135M.name)
    for reason in reasons:
        assert reason in message


def test_vocabulary_that_does_not_divide_is_refused() -> None:
    odd_vocab = dataclasses.replace(SMOLLM2_135M, vocab_size=49153)
    with pytest.raises(ShardingError, match="vocabulary of 49153 does not divide over 3 devices"):
        plan_tensor_parallel(odd_vocab, 3)


def test_kv_heads_are_replicated_when_fewer_than_devices() -> None:
    """Llama 3.1 8B at TP=32: one query head per device, each of the 8 KV heads on 4 devices."""
    plan = plan_tensor_parallel(LLAMA_8B, 32)
    assert (plan.query_heads_per_device, plan.kv_heads_per_device, plan.kv_head_copies) == (1, 1, 4)
    assert plan.weight("v").per_device_shape == (128, 4096)
    assert plan_tensor_parallel(LLAMA_8B, 8).kv_head_copies == 1


@pytest.mark.parametrize("devices", [1, 2, 4, 8, 32])
def test_every_weight_is_covered_exactly(devices: int) -> None:
    """Distinct slices (devices / copies of them) put together make the whole weight, on the right axis."""
    plan = plan_tensor_parallel(LLAMA_8B, devices)
    axis = {Split.OUTPUT_FEATURES: 0, Split.VOCABULARY: 0, Split.INPUT_FEATURES: 1}
    for shard in plan.weights:
        distinct = devices // shard.copies
        assert math.prod(shard.per_device_shape) * distinct == math.prod(shard.shape), shard.name
        for dim, (full, part) in enumerate(zip(shard.shape, shard.per_device_shape, strict=True)):
            split_here = shard.split in axis and axis[shard.split] == dim
            assert part == (full // distinct if split_here else full), shard.name
    assert {s.name for s in plan.weights if s.split is Split.REPLICATED} == {
        "embedding", "input_norm", "post_attention_norm", "final_norm"
    }  # fmt: skip


def test_collective_bytes_for_decode_and_prefill() -> None:
    plan = plan_tensor_parallel(LLAMA_8B, 8)
    decode = plan.decode_collectives(batch=32)
    assert [(c.collective, c.bytes, c.count) for c in decode] == [
        (Collective.ALL_REDUCE, 32 * 4096 * 2, 32),
        (Collective.ALL_REDUCE, 32 * 4096 * 2, 32),
        (Collective.ALL_GATHER, 32 * 128256 * 2, 1),
    ]
    prefill = plan.prefill_collectives(tokens=1024, bytes_per_element=4)
    assert [c.bytes for c in prefill] == [1024 * 4096 * 4, 1024 * 4096 * 4, 128256 * 4]
    assert plan_tensor_parallel(LLAMA_8B, 1).decode_collectives(batch=32) == ()


def test_decode_step_time_on_n300() -> None:
    """Batch 1: 64 all-reduces of 8 KiB (two 1-step phases of 4 KiB over one 12.5 GB/s link), and the
    logits' all-gather of 2 x 128256 bytes (one step of half of it)."""
    mesh = get_mesh("n300")
    calls = plan_tensor_parallel(LLAMA_8B, 2).decode_collectives(batch=1)
    all_reduce = 2 * (1e-6 + 4096 / 12.5e9)
    gather = 1e-6 + 128256 / 12.5e9
    assert sum(c.seconds(mesh) for c in calls) == pytest.approx(64 * all_reduce + gather)


def test_every_card_deployment_has_a_plan() -> None:
    for card in model_zoo.load_cards().values():
        for deployment in card.tt.deployments:
            plan = plan_tensor_parallel(card.config, math.prod(deployment.mesh_shape))
            assert plan.devices == model_zoo.TT_SYSTEMS[deployment.system]
