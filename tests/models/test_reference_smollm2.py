"""SmolLM2-135M-Instruct (the real GGUF) against Hugging Face transformers loading the same file.

transformers dequantises the GGUF to float32 and runs its own LlamaForCausalLM; the float32 CPU
path must reproduce its greedy output token for token and its logits with PCC >= 0.999. Both get
the same token ids (ttedge's tokenizer) so that only the models are compared.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.fixtures.tiny_checkpoints import smollm2_gguf_path
from tests.models.conftest_helpers import full_sequence_logits, pcc
from ttedge.checkpoint import load_checkpoint
from ttedge.engine.engine import Engine
from ttedge.engine.sampling import SamplingParams
from ttedge.models.llama.reference import LlamaModel
from ttedge.runtime.cpu import CpuModelRunner
from ttedge.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

NEW_TOKENS = 64
PLAIN_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
]
CHAT_PROMPTS = ["What is the tallest mountain on Earth?", "Write a haiku about autumn leaves."]


@pytest.fixture(scope="module")
def checkpoint():
    return load_checkpoint(smollm2_gguf_path())


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return Tokenizer.from_checkpoint(checkpoint)


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    chats = [
        tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": p}]), add_bos=False)
        for p in CHAT_PROMPTS
    ]
    return [tokenizer.encode(p) for p in PLAIN_PROMPTS] + chats


@pytest.fixture(scope="module")
def hf_model():
    path = smollm2_gguf_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    # Generate past end-of-turn tokens, as ttedge does with ignore_eos, so every prompt yields 64.
    model.generation_config.eos_token_id = None
    return model


@pytest.fixture(scope="module")
def hf_greedy(hf_model, prompts) -> list[list[int]]:
    outputs = []
    for ids in prompts:
        with torch.no_grad():
            out = hf_model.generate(
                torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
            )
        outputs.append(out[0, len(ids) :].tolist())
    return outputs


def make_engine(checkpoint, tokenizer, weight_format: str) -> Engine:
    model = LlamaModel.from_checkpoint(checkpoint, weight_format)
    runner = CpuModelRunner(model, kv_cache_bytes=64 * 2**20)
    return Engine(runner, lambda p: tokenizer.detokenizer(prompt_ids=p), tuple(tokenizer.eos_token_ids))


GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def float32_engine(checkpoint, tokenizer):
    return make_engine(checkpoint, tokenizer, "float32")


def test_float32_greedy_equals_transformers_token_for_token(float32_engine, prompts, hf_greedy):
    # All prompts in one continuous batch: different lengths, chat and plain, prefilled together.
    seqs = float32_engine.generate(prompts, GREEDY)
    for seq, expected in zip(seqs, hf_greedy, strict=True):
        assert len(seq.output_ids) == NEW_TOKENS
        assert seq.output_ids == expected


def test_float32_logits_pcc_against_transformers(float32_engine, hf_model, prompts, hf_greedy):
    for ids, continuation in zip(prompts, hf_greedy, strict=True):
        sequence = ids + continuation
        with torch.no_grad():
            expected = hf_model(torch.tensor([sequence])).logits[0]
        got = full_sequence_logits(float32_engine.runner, sequence)
        assert pcc(got, expected) >= 0.999
        # Every position, not just the mean, must agree.
        assert min(pcc(g, e) for g, e in zip(got, expected, strict=True)) >= 0.999


@pytest.mark.parametrize("weight_format", ["bfloat16", "int8", "int4"])
def test_low_precision_agreement_with_float32(
    checkpoint, tokenizer, float32_engine, prompts, hf_greedy, weight_format, record_property
):
    """Teacher-forced top-1 agreement with the float32 greedy path, and the length of the common
    prefix of free-running greedy output; reported, with a floor that catches a broken format."""
    engine = make_engine(checkpoint, tokenizer, weight_format)
    matches = total = 0
    prefixes = []
    for ids, reference in zip(prompts, hf_greedy, strict=True):
        logits = full_sequence_logits(engine.runner, ids + reference)
        predicted = logits[len(ids) - 1 : -1].argmax(dim=-1).tolist()
        matches += sum(p == r for p, r in zip(predicted, reference, strict=True))
        total += len(reference)
    for seq, reference in zip(engine.generate(prompts, GREEDY), hf_greedy, strict=True):
        prefix = next(
            (i for i, (a, b) in enumerate(zip(seq.output_ids, reference, strict=True)) if a != b), NEW_TOKENS
        )
        prefixes.append(prefix)
    agreement = matches / total
    report = {
        "format": weight_format,
        "top1_agreement": round(agreement, 4),
        "greedy_common_prefix": prefixes,
    }
    record_property("agreement", json.dumps(report))
    print(json.dumps(report))
    floors = {"bfloat16": 0.9, "int8": 0.9, "int4": 0.8}
    assert agreement >= floors[weight_format]
