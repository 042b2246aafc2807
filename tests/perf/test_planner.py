"""The capacity planner's arithmetic on hand-checked cases: bytes per element, a model's weights and KV
cache, a decode step on a made-up chip, the speculative speed-up, the overhead fit, and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fixtures.tiny_checkpoints import hf_config_dict
from ttedge import model_zoo
from ttedge.cli import main
from ttedge.config import ModelConfig
from ttedge.ethernet_mesh.sharding import plan_tensor_parallel
from ttedge.perf.calibration import (
    Observation,
    derated,
    fit_op_overhead,
    published_deployments,
    published_observations,
    published_ttft,
    tenstorrent_prefill_efficiency,
)
from ttedge.perf.hardware import HardwareSpec
from ttedge.perf.memory import kv_bytes_per_token, weight_bytes
from ttedge.perf.model_roofline import decode_step_time, prefill_time
from ttedge.perf.planner import (
    Draft,
    PlanError,
    Target,
    estimate,
    largest_batch,
    precision_for,
    resolve_model,
    suggestions,
)
from ttedge.perf.precision import BYTES_PER_ELEMENT, Precision, cpu_precision
from ttedge.perf.speculative import expected_tokens_per_step, speculative_estimate
from ttedge.perf.systems import FAMILIES, get_system

LLAMA_8B = model_zoo.find_card("llama-3.1-8b-instruct")
assert LLAMA_8B is not None


def test_block_float_bytes_include_the_shared_exponents() -> None:
    # A 32 x 32 tile: 1024 mantissas of 8 (4) bits and 64 shared exponent bytes.
    assert BYTES_PER_ELEMENT["bfloat8_b"] == (1024 + 64) / 1024 == 1.0625
    assert BYTES_PER_ELEMENT["bfloat4_b"] == (512 + 64) / 1024 == 0.5625
    # Q4_1-shaped int4: 16 bytes of nibbles, a 2-byte scale and a 2-byte minimum per 32 weights.
    assert BYTES_PER_ELEMENT["int4"] == 0.625


def test_llama_8b_weights_on_one_chip_by_hand() -> None:
    plan = plan_tensor_parallel(LLAMA_8B.config, 1)
    attention = 4096 * (4096 + 1024 + 1024) + 4096 * 4096  # q, k, v, o: 41,943,040 per layer
    mlp = 3 * 4096 * 14336  # 176,160,768 per layer
    norms = 32 * 2 * 4096 * 2 + 4096 * 2  # bfloat16
    head = 128256 * 4096 * 1.0625  # bfloat8_b
    embedding = 128256 * 4096 * 2  # bfloat16 rows
    accuracy = Precision.from_preset(LLAMA_8B.tt.preset("accuracy"))
    assert weight_bytes(plan, accuracy) == 32 * (attention + mlp) * 1.0625 + norms + head + embedding
    assert weight_bytes(plan, accuracy) == 9_024_905_216
    # Performance: MLPs in bfloat4_b except layer 31's, kept in bfloat8_b.
    performance = Precision.from_preset(LLAMA_8B.tt.preset("performance"))
    by_hand = 32 * attention * 1.0625 + 31 * mlp * 0.5625 + mlp * 1.0625 + norms + head + embedding
    assert weight_bytes(plan, performance) == by_hand == 6_294_413_312


def test_kv_bytes_per_token_follow_the_kv_heads_each_chip_holds() -> None:
    precision = Precision.from_preset(LLAMA_8B.tt.preset("performance"))
    # K and V, 32 layers, 8 KV heads of 128 in bfloat8_b.
    assert (
        kv_bytes_per_token(plan_tensor_parallel(LLAMA_8B.config, 1), precision) == 2 * 32 * 8 * 128 * 1.0625
    )
    assert kv_bytes_per_token(plan_tensor_parallel(LLAMA_8B.config, 1), precision) == 69_632
    # T3K: one KV head per chip; Galaxy: 32 chips share 8 KV heads, each chip keeps a whole one.
    assert kv_bytes_per_token(plan_tensor_parallel(LLAMA_8B.config, 8), precision) == 8_704
    assert kv_bytes_per_token(plan_tensor_parallel(LLAMA_8B.config, 32), precision) == 8_704


TINY = ModelConfig(
    name="tiny",
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=512,
    tie_word_embeddings=True,
)
BF16 = Precision("bf16", "bfloat16", "bfloat16", "bfloat16", "bfloat16", "bfloat16")
# 1 TB/s and a compute roof far above any of these steps: every op is memory-bound.
ROUND_CHIP = HardwareSpec("round", dram_bytes_per_s=1e12, peak_flops={"bfloat16": 1e18}, dram_bytes=2**30)


def test_a_decode_step_is_its_bytes_over_bandwidth_plus_overheads() -> None:
    plan = plan_tensor_parallel(TINY, 1)
    step = decode_step_time(plan, BF16, ROUND_CHIP, None, op_overhead_s=1e-6, batch=2, context=10)
    weights = (64 * 64 + 2 * 32 * 64 + 64 * 64 + 3 * 128 * 64) * 2 + 2 * 64 * 2  # projections and norms
    kv = 2 * 10 * (2 * 2 * 16 * 2)  # 2 sequences x 10 tokens, K and V of 2 heads of 16
    activations = 2 * 2 * (2 * 64 + 2 * 64 + 2 * 2 * 16 + 3 * 128) * 2  # written and read, 2 rows
    assert step.layers == pytest.approx(2 * (weights + kv + activations) / 1e12)
    assert step.lm_head == pytest.approx((256 * 64 * 2 + 2 * 64 * 2) / 1e12)
    assert step.overhead == pytest.approx((2 * 12 + 3) * 1e-6)
    assert step.collectives == 0.0 and step.memory_bound_fraction == 1.0


def test_prefill_is_compute_bound_on_a_slow_multiplier() -> None:
    slow = HardwareSpec("slow", dram_bytes_per_s=1e18, peak_flops={"bfloat16": 1e9}, dram_bytes=2**30)
    plan = plan_tensor_parallel(TINY, 1)
    prefill = prefill_time(plan, BF16, slow, None, 0.0, prompt_tokens=8)
    projections = 64 * 64 + 2 * 32 * 64 + 64 * 64 + 3 * 128 * 64
    attention = 4 * (8 * 9 // 2) * 4 * 16  # causal pairs x 4 heads x 2 matmuls of 2 FLOPs per element
    head = 2 * 1 * 256 * 64  # logits for the last row only
    assert prefill.seconds == pytest.approx((2 * (2 * 8 * projections + attention) + head) / 1e9)
    assert prefill.memory_bound_fraction == 0.0


def test_a_derated_chip_takes_longer_only_where_compute_bound() -> None:
    slow = HardwareSpec("slow", dram_bytes_per_s=1e18, peak_flops={"bfloat16": 1e9}, dram_bytes=2**30)
    plan = plan_tensor_parallel(TINY, 1)
    full = prefill_time(plan, BF16, slow, None, 0.0, prompt_tokens=8).seconds
    assert prefill_time(plan, BF16, derated(slow, 0.25), None, 0.0, 8).seconds == pytest.approx(4 * full)
    decode = decode_step_time(plan, BF16, ROUND_CHIP, None, 0.0, batch=1, context=10).seconds
    assert decode_step_time(plan, BF16, derated(ROUND_CHIP, 0.25), None, 0.0, 1, 10).seconds == decode
    with pytest.raises(ValueError, match="efficiency"):
        derated(slow, 0.0)


def test_speculative_speedup_is_leviathans_closed_form() -> None:
    assert expected_tokens_per_step(0.5, 2) == pytest.approx(1.75)  # 1 + 0.5 + 0.25
    assert expected_tokens_per_step(1.0, 3) == 4.0
    assert expected_tokens_per_step(0.0, 5) == 1.0
    spec = speculative_estimate(
        0.5, 2, draft_step_seconds=0.1, verify_step_seconds=1.0, plain_step_seconds=1.0
    )
    assert spec.speedup == pytest.approx(1.75 / 1.2)
    assert spec.seconds_per_token == pytest.approx(1.2 / 1.75)
    with pytest.raises(ValueError, match="between 0 and 1"):
        expected_tokens_per_step(1.5, 2)
    # Prompt lookup drafts on the host: no draft cost, the speed-up is the tokens per verify step.
    assert speculative_estimate(0.5, 2, 0.0, 1.0, 1.0).speedup == pytest.approx(1.75)
    with pytest.raises(ValueError, match="no negative time"):
        speculative_estimate(0.5, 2, -1.0, 1.0, 1.0)


def test_the_overhead_fit_recovers_a_known_overhead() -> None:
    truth = 20e-6
    observations = [
        Observation(f"o{i}", measured_seconds=r + n * truth, roofline_seconds=r, ops=n)
        for i, (r, n) in enumerate([(0.01, 100), (0.002, 400), (0.05, 50)])
    ]
    assert fit_op_overhead(observations) == pytest.approx(truth)
    # Measurements faster than the roofline: no overhead, never a negative one.
    assert fit_op_overhead([Observation("fast", 0.001, 0.002, 10)]) == 0.0


def test_one_overhead_per_family_fits_tenstorrents_published_speeds() -> None:
    wormhole = [o for o in published_observations(FAMILIES["wormhole"]) if "galaxy" not in o.label]
    overhead = fit_op_overhead(wormhole)
    assert 10e-6 < overhead < 100e-6
    assert max(abs(o.relative_error(overhead)) for o in wormhole) < 0.2
    # Prefill, at the fitted fraction of peak FLOP/s: within 25% of the published TTFT on n150 and n300
    # (T3K's are far slower than the modelled collectives allow: docs/planner.md).
    efficiency = tenstorrent_prefill_efficiency(FAMILIES["wormhole"])
    assert 0.05 < efficiency < 0.5
    one_or_two_chips = [
        d for d in published_deployments(FAMILIES["wormhole"]) if d.ttft_s and d.system.chips <= 2
    ]
    assert len(one_or_two_chips) == 12  # 1B, 3B and 8B, two presets, n150 and n300
    for d in one_or_two_chips:
        assert published_ttft(d, overhead, efficiency) == pytest.approx(d.ttft_s, rel=0.25), d.label


def test_a_target_that_does_not_fit_is_refused_with_what_to_change() -> None:
    system = get_system("n150")
    target = Target(batch=32, context=4096, prompt_tokens=4096)
    result = estimate(LLAMA_8B.config, precision_for(LLAMA_8B, system, None, 32), system, target)
    assert not result.memory.fits and not result.serves
    # Left for the KV cache: 12 GiB - 6.29 GB weights - 126 MB activations - 30 MB trace - 5% reserve
    # = 5.79 GB; a 4096-token user takes 4096 x 69,632 bytes = 285 MB: 20 users.
    assert result.memory.free_for_kv == pytest.approx(5_790_414_361.6)
    advice = suggestions(result, LLAMA_8B.config, LLAMA_8B)
    assert advice[0] == "serve at most 20 users at 4096 tokens of context"
    assert any(line.startswith("or use --hardware n300") for line in advice)
    fits = estimate(
        LLAMA_8B.config, precision_for(LLAMA_8B, system, None, 20), system, Target(20, 4096, 4096)
    )
    assert fits.memory.fits and suggestions(fits, LLAMA_8B.config, LLAMA_8B) == []


def test_a_draft_takes_its_weights_and_kv_cache_from_the_same_chips() -> None:
    draft_card = model_zoo.find_card("llama-3.2-1b-instruct")
    assert draft_card is not None
    system = get_system("n150")
    target = Target(batch=32, context=4096, prompt_tokens=4096)
    draft = Draft(draft_card.config, precision_for(draft_card, system, None, 32), acceptance=0.7)
    alone = estimate(LLAMA_8B.config, precision_for(LLAMA_8B, system, None, 32), system, target)
    paired = estimate(LLAMA_8B.config, alone.precision, system, target, draft)
    draft_plan = plan_tensor_parallel(draft_card.config, 1)
    # The 1B's KV: 16 layers x 8 KV heads of 64 in bfloat8_b, K and V.
    assert kv_bytes_per_token(draft_plan, draft.precision) == 2 * 16 * 8 * 64 * 1.0625 == 17_408
    assert paired.memory.kv_cache == alone.memory.kv_cache + 32 * 4096 * 17_408
    assert paired.memory.weights == alone.memory.weights + weight_bytes(draft_plan, draft.precision)
    assert largest_batch(paired, LLAMA_8B.config, draft) == int(paired.memory.free_for_kv // (4096 * 87_040))


def test_a_split_that_does_not_divide_is_a_plan_error() -> None:
    smollm = model_zoo.find_card("smollm2-135m-instruct")
    assert smollm is not None
    system = get_system("n300")
    with pytest.raises(PlanError, match="9 query heads do not divide over 2 devices"):
        estimate(smollm.config, precision_for(smollm, system, None, 1), system, Target(1, 128, 128))


def test_cpu_formats_read_what_the_cpu_backend_reads() -> None:
    from ttedge.models.llama.linear import AUTO_HEAD_INT8_MAX_ROWS, AUTO_INT4_MAX_ROWS
    from ttedge.perf.precision import CPU_AUTO_HEAD_INT8_MAX_ROWS, CPU_AUTO_INT4_MAX_ROWS

    assert (CPU_AUTO_INT4_MAX_ROWS, CPU_AUTO_HEAD_INT8_MAX_ROWS) == (
        AUTO_INT4_MAX_ROWS,
        AUTO_HEAD_INT8_MAX_ROWS,
    )
    assert (cpu_precision("auto", 1).mlp, cpu_precision("auto", 1).lm_head) == ("int4", "int8")
    assert (cpu_precision("auto", 8).mlp, cpu_precision("auto", 8).lm_head) == ("int4", "bfloat16")
    assert cpu_precision("auto", 9).mlp == "bfloat16"
    assert cpu_precision("int4", 32).lm_head == "int8"
    assert cpu_precision("float32", 1).kv_cache == "float32"


def test_a_config_json_is_planned_with_its_card_or_the_default_preset(tmp_path: Path) -> None:
    def write(directory: Path, config: ModelConfig) -> Path:
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps(hf_config_dict(config)))
        return directory

    smollm = model_zoo.find_card("smollm2-135m-instruct")
    assert smollm is not None
    card, config = resolve_model(str(write(tmp_path / "smollm", smollm.config)))
    assert card is smollm and config.num_heads == 9
    card, config = resolve_model(str(write(tmp_path / "tiny", TINY) / "config.json"))
    assert card is None and config.name == "tiny"
    assert precision_for(None, get_system("n150"), None, 1).name == "default"
    with pytest.raises(PlanError, match="only 'default'"):
        precision_for(None, get_system("n150"), "performance", 1)
    with pytest.raises(PlanError, match="neither a model card"):
        resolve_model(str(tmp_path / "missing"))


def test_plan_command_exit_status_and_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "llama-3.1-8b", "--hardware", "n150", "--batch", "32"]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "smallest system of the family that serves this: n300" in out
    assert main(["plan", "--model", "llama-3.2-1b-instruct", "--hardware", "n150", "--batch", "8"]) == 0
    assert "memory per chip: fits" in capsys.readouterr().out
    assert main(["plan", "--model", "llama-3.1-8b", "--hardware", "n151"]) == 2
    assert "unknown hardware 'n151'" in capsys.readouterr().err
    assert main(["plan", "--model", "llama-3.1-8b", "--draft", "llama-3.2-1b-instruct"]) == 2
    assert "--draft needs --acceptance" in capsys.readouterr().err
    assert main(["plan", "--model", "llama-3.1-8b", "--context", "-5"]) == 2
    assert "context must be at least 1" in capsys.readouterr().err
