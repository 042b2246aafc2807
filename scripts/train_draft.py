"""Measure self-speculative drafts of SmolLM2-135M (a subset of its own layers), train an exit adapter for
the promising ones, and write the best to model_zoo/drafts/.

    python scripts/train_draft.py [--work out/train_draft] [--out model_zoo/drafts] [--threads 1]
    python scripts/train_draft.py --train ""     # measure the untrained subsets only

1. Data: 36 instruction templates of 10 kinds (explanations, lists, code, rewriting and summarising a
   given passage, questions, translation, writing, comparisons, arithmetic word problems), filled from
   a fixed seed: 348 chat prompts, 20% held out. Continuations from the target itself through the
   engine (default `auto` weights, batches of 32, at most 160 tokens): a greedy one of every prompt and
   a sampled one (temperature 0.7, seed = prompt index) of every third. The draft is meant to agree
   with the target, not with any human text.
2. One teacher-forced pass of the target over every sequence keeps, per response position, its
   final-norm hidden state (the target's logits are the LM head of it, recomputed when needed: a
   49152-wide row per token would not fit in memory) and, for every candidate subset, the hidden state
   after the subset's last layer run through the subset alone (what the draft's adapter receives; for a
   prefix of the layers it is the target's own). The layers are frozen, so these are computed once.
3. Untrained agreement: the fraction of held-out response positions where the subset's argmax (exit
   adapter = identity) equals the target's.
4. Training: a residual SwiGLU exit adapter (ttedge/collab/exit_adapter.py) per chosen subset, on
   KL(target || draft) over the full next-token distributions, AdamW, a fixed number of steps.
5. Cost at batch 1 through CpuModelRunner in `auto`: a draft decode step and the target's verification
   of k + 1 rows, relative to one target decode step, measured in the same run.
6. Expected speed-up of greedy speculative decoding with k drafts per step at per-token acceptance a:
   (1 - a^(k+1)) / (1 - a) tokens per step for k * c + v_k target decode steps. The best draft is
   written to --out with its measurements in the file's metadata.

Everything is seeded; generated data and hidden states are cached in --work, so a rerun only retrains.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import shlex
import string
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ttedge.bootstrap import LoadedEngine, load_engine
from ttedge.collab.exit_adapter import (
    ADAPTER_KIND,
    DOWN,
    FILE_FORMAT,
    GATE_UP,
    NORM,
    ExitAdapter,
    config_fingerprint,
    describe_layers,
    residual_swiglu,
)
from ttedge.config import EngineSettings
from ttedge.engine.sampling import SamplingParams
from ttedge.models.llama.batch import BatchLayout, SequenceChunk
from ttedge.models.llama.reference import LlamaModel, rms_norm
from ttedge.runtime.base import StepInput
from ttedge.runtime.cpu import CpuModelRunner
from ttedge.runtime.kv_cache import blocks_needed

PASSAGES = [
    "The city council met on Tuesday to discuss the new bike lanes. Several residents spoke in favour, "
    "saying the lanes would make cycling safer for children. Shop owners worried about losing parking "
    "spaces. The council agreed to run a six-month trial on two streets before deciding.",
    "Honey bees communicate the location of flowers through a waggle dance. The angle of the dance "
    "relative to the sun shows the direction, and the length of the waggle shows the distance. Other "
    "bees follow the dancer and then fly out to find the food.",
    "Our team missed the release date because the test servers were down for three days. We have moved "
    "the tests to a second provider and added alerts, so the next release should ship on time.",
    "The Great Wall of China is not a single wall but a series of walls built over many centuries. Most "
    "of what stands today was built during the Ming dynasty. It was meant to protect against raids from "
    "the north, and it also helped control trade along the Silk Road.",
    "Regular exercise improves sleep, mood and memory. Even a twenty-minute walk each day lowers the risk "
    "of heart disease. Experts recommend mixing cardio with strength training twice a week.",
    "The library will close early on Friday for staff training. Books due that day can be returned on "
    "Monday without a fine. The online catalogue and e-book service will stay available all weekend.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen. It happens in the "
    "chloroplasts of plant cells, where chlorophyll absorbs mostly red and blue light.",
    "i think we should of left earlier, the traffic was really bad and we was late for the meeting. "
    "next time lets check the map before we go so this dont happen again",
    "The new phone has a larger battery, a brighter screen and a faster chip, but it costs two hundred "
    "dollars more than last year's model. Reviewers praised the camera but found the device heavy.",
    "Volcanoes form where magma from deep inside the Earth reaches the surface. Some erupt explosively, "
    "throwing ash high into the sky, while others release slow rivers of lava.",
    "def average(xs):\n    total = 0\n    for x in xs:\n        total = total + x\n"
    "    return total / len(xs)",
    "Dear team, the office will be closed next Monday for the public holiday. Please make sure your "
    "work is saved and your computers are shut down before you leave on Friday. Thanks, Maria",
]

_SLOT_TEXT = {
    "concept": (
        "gravity|inflation|recursion|machine learning|entropy|supply and demand|the immune system|"
        "encryption|compound interest|natural selection|a hash table|climate change|electricity|"
        "the stock market|probability|photosynthesis"
    ),
    "process": (
        "a rainbow forms|bread rises|a vaccine works|the heart pumps blood|a plane stays in the air|"
        "a refrigerator keeps food cold|the internet sends a message|a seed grows into a plant|"
        "a battery stores energy|the moon causes tides|a compass finds north|soap cleans hands"
    ),
    "audience": "a five-year-old|a high school student|a busy manager|a programmer|my grandmother",
    "things": (
        "fruits rich in vitamin C|programming languages|musical instruments|board games|rivers in Africa|"
        "healthy breakfast ideas|ways to save energy at home|famous scientists|uses for a paperclip|"
        "European capitals|hobbies for rainy days|mammals that live in the sea"
    ),
    "n": "3|4|5|7|10",
    "code_task": (
        "reverses a string|checks whether a number is prime|counts the words in a sentence|"
        "returns the largest element of a list|checks whether a word is a palindrome|"
        "computes the nth Fibonacci number|removes duplicates from a list|merges two sorted lists|"
        "converts Celsius to Fahrenheit|finds the most common letter in a text|flattens a nested list|"
        "validates an email address"
    ),
    "lang": "Python|JavaScript|C|Java|Rust|Go|SQL|Bash",
    "passage": "|".join(str(i) for i in range(len(PASSAGES))),
    "style": (
        "more formal|simpler, for a child|shorter|more polite|as a bulleted list|in the passive voice|"
        "as a tweet|more enthusiastic"
    ),
    "question": (
        "Why is the sky blue?|How many continents are there?|What causes the seasons?|"
        "Who invented the telephone?|What is the largest planet in our solar system?|"
        "Why do cats purr?|How do airplanes fly?|What is the boiling point of water?|"
        "Why do leaves change colour in autumn?|How far is the moon from the Earth?|"
        "What is the difference between weather and climate?|Why do we dream?"
    ),
    "phrase": (
        "good morning|thank you very much|where is the train station|happy birthday|see you tomorrow|"
        "the weather is nice today|I would like a cup of coffee|how much does this cost"
    ),
    "language": "French|Spanish|German|Italian|Portuguese",
    "person": "my boss|a friend|my landlord|a teacher|a customer|my neighbour",
    "reason": "a late payment|a birthday party|a missed meeting|a broken window|a job offer|a holiday plan",
    "character": (
        "a curious robot|a lonely dragon|a clever fox|an old fisherman|a space explorer|a shy ghost|"
        "a detective|a baker"
    ),
    "plot": "finds a secret door|loses their way home|learns to fly|makes an unlikely friend|wins a race",
    "pair": (
        "cats and dogs|tea and coffee|summer and winter|books and movies|Python and Java|trains and planes|"
        "renting and buying a home|electric and petrol cars"
    ),
    "item": "apples|pencils|tickets|books|cookies|marbles",
    "a": "3|7|12|15|24|36",
    "b": "2|4|5|6|9",
    "topic": "the ocean|autumn|friendship|a city at night|the moon|coffee|rain|mountains",
}
SLOTS = {name: text.split("|") for name, text in _SLOT_TEXT.items()}

# (kind, template): every {slot} is filled from SLOTS; {passage} is replaced by PASSAGES[index].
TEMPLATES: list[tuple[str, str]] = [
    ("explain", "Explain {concept} to {audience}."),
    ("explain", "Explain how {process}."),
    ("explain", "What is {concept}? Give an example."),
    ("explain", "Explain step by step how {process}."),
    ("list", "List {n} {things}."),
    ("list", "Give me {n} {things}, with one sentence about each."),
    ("list", "What are the pros and cons of {concept}? Answer as a list."),
    ("code", "Write a {lang} function that {code_task}."),
    ("code", "Write a Python function that {code_task}, with a docstring and an example."),
    ("code", "Explain this code and suggest an improvement:\n\n{passage}"),
    ("code", "Write a unit test in Python for a function that {code_task}."),
    ("rewrite", "Rewrite the following text to be {style}:\n\n{passage}"),
    ("rewrite", "Fix the grammar and spelling in this text:\n\n{passage}"),
    ("rewrite", "Paraphrase this paragraph in your own words:\n\n{passage}"),
    ("summary", "Summarize the following text in one sentence:\n\n{passage}"),
    ("summary", "Summarize the main points of this text as bullet points:\n\n{passage}"),
    ("summary", "What is the main idea of this text?\n\n{passage}"),
    ("summary", "Write a title for this text and explain your choice:\n\n{passage}"),
    ("qa", "{question}"),
    ("qa", "{question} Answer in one sentence."),
    ("qa", "{question} Explain it to {audience}."),
    ("qa", "Read the text and answer: who or what is it about, and what happens?\n\n{passage}"),
    ("translate", "Translate '{phrase}' into {language}."),
    ("translate", "How do you say '{phrase}' in {language}? Explain the grammar."),
    ("write", "Write an email to {person} about {reason}."),
    ("write", "Write a short story about {character} who {plot}."),
    ("write", "Write a poem about {topic}."),
    ("write", "Write a short text message to {person} about {reason}."),
    ("write", "Write a product review of a new {item} you bought."),
    ("compare", "Compare {pair}."),
    ("compare", "What are the differences between {pair}? Use a table."),
    ("compare", "Which is better, {pair}? Give reasons."),
    ("math", "If I have {a} {item} and give away {b}, how many are left? Explain."),
    ("math", "A box holds {a} {item}. How many {item} are in {b} boxes? Show your work."),
    ("math", "What is {a} times {b}, plus {a}? Show the steps."),
    ("math", "Split {a} {item} equally among {b} friends. How many does each get, and how many are left?"),
]


@dataclass(frozen=True)
class Prompt:
    kind: str
    text: str


def build_prompts(per_template: int = 10, seed: int = 0) -> list[Prompt]:
    """``per_template`` distinct fillings of every template, in a fixed order."""
    rng = random.Random(seed)
    prompts = []
    for kind, template in TEMPLATES:
        names = sorted({name for _, name, _, _ in string.Formatter().parse(template) if name})
        combos = list(itertools.product(*(SLOTS[n] for n in names)))
        for combo in rng.sample(combos, min(per_template, len(combos))):
            filling = dict(zip(names, combo, strict=True))
            if "passage" in filling:
                filling["passage"] = PASSAGES[int(filling["passage"])]
            prompts.append(Prompt(kind, template.format(**filling)))
    return prompts


def split(num_prompts: int, test_fraction: float = 0.2, seed: int = 1) -> tuple[list[int], list[int]]:
    """Indices of the training and the held-out prompts."""
    order = list(range(num_prompts))
    random.Random(seed).shuffle(order)
    cut = round(num_prompts * test_fraction)
    return sorted(order[cut:]), sorted(order[:cut])


@dataclass(frozen=True)
class Example:
    """One teacher sequence: a chat prompt and the target's continuation of it."""

    prompt_index: int
    sampled: bool
    prompt_ids: list[int]
    output_ids: list[int]


def generate(
    loaded: LoadedEngine,
    prompts: list[Prompt],
    indices: list[int],
    max_tokens: int,
    temperature: float,
    batch: int = 32,
) -> list[Example]:
    """The target's continuations of ``prompts[i] for i in indices`` in fixed batches of ``batch`` (the
    batch shape changes rounding under `auto`, so fixing it makes the data reproducible); sampled ones
    seeded by prompt index."""
    started = time.perf_counter()
    examples: list[Example] = []
    for first in range(0, len(indices), batch):
        part = indices[first : first + batch]
        ids = [loaded.tokenizer.encode_chat([{"role": "user", "content": prompts[i].text}]) for i in part]
        seqs = [
            loaded.engine.add_request(
                prompt, SamplingParams(temperature=temperature, seed=i, max_tokens=max_tokens)
            )
            for i, prompt in zip(part, ids, strict=True)
        ]
        for _ in loaded.engine.stream():
            pass
        examples.extend(
            Example(i, temperature > 0, prompt, list(s.output_ids))
            for i, prompt, s in zip(part, ids, seqs, strict=True)
        )
        tokens = sum(len(e.output_ids) for e in examples)
        print(
            f"  T={temperature}: {len(examples)}/{len(indices)} prompts, {tokens} tokens, "
            f"{time.perf_counter() - started:.0f} s",
            flush=True,
        )
    return examples


def teacher_data(
    loaded: LoadedEngine, prompts: list[Prompt], work: Path, max_tokens: int, sampled_every: int
) -> list[Example]:
    """Greedy continuations of every prompt and sampled ones (temperature 0.7) of every
    ``sampled_every``-th, each set cached in ``work``."""
    examples = []
    everything = list(range(len(prompts)))
    for temperature, chosen in ((0.0, everything), (0.7, everything[::sampled_every])):
        path = work / f"teacher_T{temperature}_{max_tokens}_{len(chosen)}.json"
        if not path.exists():
            made = generate(loaded, prompts, chosen, max_tokens, temperature)
            path.write_text(json.dumps([e.__dict__ for e in made]))
        examples += [Example(**row) for row in json.loads(path.read_text())]
    return examples


LayerSubset = tuple[int, ...]


def parse_subset(text: str) -> LayerSubset:
    """``0-5`` or ``0-3,29``: the inverse of describe_layers."""
    indices: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        indices.extend(range(int(first), int(last or first) + 1))
    return tuple(indices)


@dataclass
class Positions:
    """Hidden states at the response positions of some examples (the positions whose next token the
    draft would propose), bfloat16 [positions, hidden]."""

    teacher: torch.Tensor  # the target's final-norm hidden states
    exits: dict[LayerSubset, torch.Tensor]  # per subset, its last layer's output (the adapter's input)


def response_rows(example: Example) -> range:
    """Rows of the full sequence whose logits predict the response tokens."""
    start = len(example.prompt_ids) - 1
    return range(start, start + len(example.output_ids))


def response_row_indices(examples: Sequence[Example]) -> list[int]:
    """Rows of the response positions in one prefill of ``examples`` laid end to end."""
    rows: list[int] = []
    start = 0
    for example in examples:
        rows.extend(start + r for r in response_rows(example))
        start += len(example.prompt_ids) + len(example.output_ids)
    return rows


def prefill_hidden(model: LlamaModel, runner: CpuModelRunner, examples: Sequence[Example]) -> torch.Tensor:
    """One prefill of whole examples through ``model`` in ``runner``'s KV memory: the final-norm hidden
    states of their response rows."""
    ids = [e.prompt_ids + e.output_ids for e in examples]
    tables = [runner.allocator.allocate(blocks_needed(len(x))) for x in ids]
    try:
        layout = BatchLayout.build(
            [SequenceChunk(0, len(x), t, all_logits=True) for x, t in zip(ids, tables, strict=True)]
        )
        hidden = model.final_hidden(torch.tensor([t for x in ids for t in x]), layout, runner.cache)
    finally:
        for table in tables:
            runner.allocator.free(table)
    return hidden[response_row_indices(examples)]


def exit_hidden(
    target: LlamaModel, subset: LayerSubset, runner: CpuModelRunner, examples: Sequence[Example]
) -> torch.Tensor:
    """What the exit adapter of ``subset`` receives at the response rows: captured by an adapter that
    passes its input through."""
    captured: list[torch.Tensor] = []

    def capture(x: torch.Tensor) -> torch.Tensor:
        captured.append(x.clone())
        return x

    prefill_hidden(target.layer_subset(subset, capture), runner, examples)
    # The adapter saw every row of the prefill, before the selection prefill_hidden makes.
    return captured[0][response_row_indices(examples)]


def batches_of(examples: Sequence[Example], max_tokens: int = 2048) -> list[list[Example]]:
    """Consecutive examples grouped into prefills of about ``max_tokens`` tokens."""
    batches: list[list[Example]] = [[]]
    for example in examples:
        if batches[-1] and sum(len(e.prompt_ids) + len(e.output_ids) for e in batches[-1]) > max_tokens:
            batches.append([])
        batches[-1].append(example)
    return batches


def cached_positions(
    path: Path,
    target: LlamaModel,
    runner: CpuModelRunner,
    examples: Sequence[Example],
    subsets: Sequence[LayerSubset],
) -> Positions:
    """Teacher and exit hidden states (bfloat16) at the response rows of ``examples``, computed for what
    ``path`` does not hold yet and saved there."""
    stored: dict[str, torch.Tensor] = torch.load(path) if path.exists() else {}
    if "teacher" in stored and len(stored["teacher"]) != len(response_row_indices(examples)):
        raise SystemExit(f"{path} was made from other teacher data; delete it")
    started = time.perf_counter()
    batches = batches_of(examples)
    if "teacher" not in stored:
        stored["teacher"] = torch.cat([prefill_hidden(target, runner, b) for b in batches]).bfloat16()
    missing = [s for s in subsets if describe_layers(s) not in stored]
    for subset in missing:
        stored[describe_layers(subset)] = torch.cat(
            [exit_hidden(target, subset, runner, b) for b in batches]
        ).bfloat16()
    if missing or not path.exists():
        torch.save(stored, path)
        print(
            f"  {path.name}: {len(stored['teacher'])} positions, {len(missing)} new subsets, "
            f"{time.perf_counter() - started:.0f} s",
            flush=True,
        )
    return Positions(stored["teacher"], {s: stored[describe_layers(s)] for s in subsets})


def argmax_tokens(lm_head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
    """The LM head's argmax of final-norm hidden states, a chunk of rows at a time (a 49152-wide
    row of logits per position would not fit at once)."""
    return torch.cat([lm_head(chunk).argmax(-1) for chunk in hidden.split(1024)])


def draft_final_hidden(exits: torch.Tensor, target: LlamaModel, adapter: ExitAdapter | None) -> torch.Tensor:
    """What the draft's final norm gives for its last layer's outputs ``exits``: the same ops in the same
    dtype as ``LlamaModel.final_hidden`` after its layers."""
    x = exits.to(target.dtype)
    if adapter is not None:
        x = adapter(x)
    return rms_norm(x, target.norm, target.config.rms_norm_eps)


class TrainableAdapter(torch.nn.Module):
    """The exit adapter's float32 parameters for training; it computes ``residual_swiglu``, the math
    the draft runs. ``down`` starts at zero, so training starts from the plain layer subset."""

    def __init__(self, hidden: int, rank: int, eps: float, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.eps = eps
        self.norm = torch.nn.Parameter(torch.ones(hidden))
        self.gate_up = torch.nn.Parameter(torch.randn(2 * rank, hidden, generator=generator) / hidden**0.5)
        self.down = torch.nn.Parameter(torch.zeros(hidden, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return residual_swiglu(x, self.norm, self.gate_up, self.down, self.eps)

    def inference(self, dtype: torch.dtype) -> ExitAdapter:
        return ExitAdapter(
            self.norm.detach().to(dtype),
            self.gate_up.detach().to(dtype),
            self.down.detach().to(dtype),
            self.eps,
        )


def draft_kl(
    adapter: TrainableAdapter,
    exits: torch.Tensor,
    teacher: torch.Tensor,
    head: torch.Tensor,
    final_norm: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """Mean KL(target || draft) over rows: the target's distribution from its final-norm hidden states
    ``teacher``, the draft's from ``exits`` through the adapter, the final norm and the LM head ``head``
    (bfloat16 [vocab, hidden], frozen; the softmaxes in float32)."""
    with torch.no_grad():
        teacher_logp = F.log_softmax(F.linear(teacher.to(head.dtype), head).float(), dim=-1)
    hidden = F.rms_norm(adapter(exits.float()), (exits.shape[-1],), final_norm.float(), eps)
    draft_logp = F.log_softmax(F.linear(hidden.to(head.dtype), head).float(), dim=-1)
    return F.kl_div(draft_logp, teacher_logp, log_target=True, reduction="batchmean")


def train_adapter(
    exits: torch.Tensor,
    teacher: torch.Tensor,
    head: torch.Tensor,
    final_norm: torch.Tensor,
    eps: float,
    rank: int,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
) -> tuple[TrainableAdapter, list[float]]:
    """AdamW on ``draft_kl`` over random batches of rows, cosine learning rate; returns the adapter and
    the loss of every step."""
    torch.manual_seed(seed)
    adapter = TrainableAdapter(exits.shape[-1], rank, eps, seed)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        rows = torch.randint(len(exits), (batch,), generator=generator)
        loss = draft_kl(adapter, exits[rows], teacher[rows], head, final_norm, eps)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return adapter, losses


def prefill(runner: CpuModelRunner, prompt: list[int], extra: int) -> list[int]:
    """A block table holding ``prompt`` (run through ``runner``) with room for ``extra`` more tokens."""
    table = runner.allocator.allocate(blocks_needed(len(prompt) + extra))
    runner.run([StepInput(prompt, 0, table)])
    return table


def decode_ms(runner: CpuModelRunner, prompt: list[int], steps: int) -> float:
    """Median milliseconds of one batch-1 decode step after ``prompt``."""
    table = prefill(runner, prompt, steps)
    times = []
    token = prompt[-1]
    try:
        for step in range(steps):
            started = time.perf_counter()
            (logits,) = runner.run([StepInput([token], len(prompt) + step, table)])
            times.append(time.perf_counter() - started)
            token = int(logits.argmax())
    finally:
        runner.allocator.free(table)
    return 1000 * sorted(times)[len(times) // 2]


def verify_ms(runner: CpuModelRunner, prompt: list[int], rows: int, repeats: int) -> float:
    """Median milliseconds of the target checking ``rows - 1`` drafts: ``rows`` new tokens with logits
    for each, at batch 1, re-run at the same positions (overwriting them)."""
    table = prefill(runner, prompt, rows)
    times = []
    try:
        for _ in range(repeats):
            started = time.perf_counter()
            runner.run([StepInput(prompt[-rows:], len(prompt), table, all_logits=True)])
            times.append(time.perf_counter() - started)
    finally:
        runner.allocator.free(table)
    return 1000 * sorted(times)[len(times) // 2]


def expected_speedup(acceptance: float, cost: float, verify_cost: float, k: int) -> float:
    """Tokens per target-decode-step equivalent of greedy speculation with ``k`` drafts per step, when
    each draft is accepted with probability ``acceptance`` independently of the others."""
    tokens = (1 - acceptance ** (k + 1)) / (1 - acceptance) if acceptance < 1 else k + 1
    return tokens / (k * cost + verify_cost)


def save_draft(
    path: Path,
    adapter: ExitAdapter,
    subset: LayerSubset,
    target_id: str,
    target_fingerprint: str,
    metadata: dict[str, object],
) -> None:
    """The adapter's tensors in bfloat16 and the draft's description, as load_self_draft reads it."""
    tensors = {
        NORM: adapter.norm.to(torch.bfloat16).contiguous(),
        GATE_UP: adapter.gate_up.to(torch.bfloat16).contiguous(),
        DOWN: adapter.down.to(torch.bfloat16).contiguous(),
    }
    header = {
        "format": FILE_FORMAT,
        "target": target_id,
        "target_fingerprint": target_fingerprint,
        "layer_indices": json.dumps(list(subset)),
        "adapter_kind": ADAPTER_KIND,
        "adapter_rank": str(adapter.rank),
        "rms_norm_eps": repr(adapter.eps),
    } | {key: value if isinstance(value, str) else json.dumps(value) for key, value in metadata.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=header)


CANDIDATES = "0-1 0-3 0-5 0-7 0-9 0-11 0-15 0-3,29 0-5,29 0-7,29 0,6,12,18,24,29"
TRAINED = "0-5 0-11"


@dataclass(frozen=True)
class DraftChoice:
    """One draft's measured agreement and cost, and what they promise for greedy speculation."""

    layers: LayerSubset
    adapter: str
    agreement: float
    cost_ratio: float  # one draft decode step / one target decode step, batch 1
    best_k: int
    expected_speedup: float


def agreement(predicted: torch.Tensor, expected: torch.Tensor) -> float:
    return float((predicted == expected).float().mean())


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=Path("out/train_draft"))
    parser.add_argument(
        "--out", type=Path, default=Path("model_zoo/drafts"), help="where the chosen draft goes"
    )
    parser.add_argument("--max-tokens", type=int, default=160, help="longest teacher continuation")
    parser.add_argument(
        "--sampled-every", type=int, default=3, help="sample a continuation of every n-th prompt"
    )
    parser.add_argument("--candidates", default=CANDIDATES, help="layer subsets measured untrained")
    parser.add_argument("--train", default=TRAINED, help="layer subsets given an adapter ('' = none)")
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--batch", type=int, default=192, help="response positions per training step")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default all cores; 1 on a shared machine)"
    )
    parser.add_argument("--timing-steps", type=int, default=48, help="decode steps timed per model")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    loaded = load_engine(EngineSettings(max_num_seqs=32, kv_cache_mb=320, threads=args.threads))
    runner = loaded.engine.runner
    if not isinstance(runner, CpuModelRunner) or loaded.card is None:
        raise SystemExit("the target must be a zoo model on the CPU backend")
    target = runner.model
    candidates = [parse_subset(text) for text in args.candidates.split()]
    trained = [parse_subset(text) for text in args.train.split()]

    prompts = build_prompts()
    train_prompts, test_prompts = (set(indices) for indices in split(len(prompts)))
    examples = teacher_data(loaded, prompts, args.work, args.max_tokens, args.sampled_every)
    train_examples = [e for e in examples if e.prompt_index in train_prompts]
    test_examples = [e for e in examples if e.prompt_index in test_prompts]
    data_seconds = time.perf_counter() - started
    print(f"{len(prompts)} prompts, {len(examples)} teacher sequences ({data_seconds:.0f} s)", flush=True)

    held_out = cached_positions(
        args.work / "held_out.pt", target, runner, test_examples, list(dict.fromkeys(candidates + trained))
    )
    expected = argmax_tokens(target.lm_head, held_out.teacher)
    untrained = {
        subset: agreement(argmax_tokens(target.lm_head, draft_final_hidden(exits, target, None)), expected)
        for subset, exits in held_out.exits.items()
    }
    print("\nUntrained agreement with the target's argmax on held-out response positions:")
    print(
        markdown_table(
            ["layers", "kept", "agreement"],
            [[describe_layers(s), len(s), f"{untrained[s]:.3f}"] for s in held_out.exits],
        ),
        flush=True,
    )
    if not trained:
        return

    training = cached_positions(args.work / "train.pt", target, runner, train_examples, trained)
    head_name = "embed.weight" if target.config.tie_word_embeddings else "lm_head.weight"
    head = loaded.checkpoint.load(head_name).to(torch.bfloat16)
    eps = target.config.rms_norm_eps
    adapters: dict[LayerSubset, ExitAdapter] = {}
    results: dict[LayerSubset, dict[str, float]] = {}
    for subset in trained:
        begun = time.perf_counter()
        adapter, losses = train_adapter(
            training.exits[subset],
            training.teacher,
            head,
            target.norm,
            eps,
            args.rank,
            args.steps,
            args.batch,
            args.lr,
            args.seed,
        )
        adapters[subset] = adapter.inference(target.dtype)
        sample = slice(0, 4096)
        with torch.no_grad():
            kl_before = float(
                draft_kl(
                    TrainableAdapter(target.config.hidden_size, args.rank, eps, args.seed),
                    held_out.exits[subset][sample],
                    held_out.teacher[sample],
                    head,
                    target.norm,
                    eps,
                )
            )
            kl_after = float(
                draft_kl(
                    adapter, held_out.exits[subset][sample], held_out.teacher[sample], head, target.norm, eps
                )
            )
        final = draft_final_hidden(held_out.exits[subset], target, adapters[subset])
        results[subset] = {
            "untrained_agreement": untrained[subset],
            "trained_agreement": agreement(argmax_tokens(target.lm_head, final), expected),
            "held_out_kl_untrained": kl_before,
            "held_out_kl_trained": kl_after,
            "final_train_kl": sum(losses[-20:]) / len(losses[-20:]),
            "train_seconds": time.perf_counter() - begun,
        }
        print(f"  trained {describe_layers(subset)}: {results[subset]}", flush=True)

    # Costs at batch 1 in the runtime's default format, every model timed in this run, the target twice
    # (before and after the drafts) so that a drift in the machine's speed shows.
    prompt = loaded.tokenizer.encode_chat(
        [{"role": "user", "content": prompts[sorted(test_prompts)[0]].text}]
    )
    kv_bytes = 64 * 2**20
    target_ms = [decode_ms(runner, prompt, args.timing_steps)]
    draft_ms = {}
    for subset in list(dict.fromkeys(candidates + trained)):
        draft = target.layer_subset(subset, adapters.get(subset))
        draft_ms[subset] = decode_ms(CpuModelRunner(draft, kv_bytes), prompt, args.timing_steps)
    target_ms.append(decode_ms(runner, prompt, args.timing_steps))
    decode = sum(target_ms) / 2
    verify = {k: verify_ms(runner, prompt, k + 1, args.timing_steps) / decode for k in range(1, 7)}
    print(f"\ntarget decode {target_ms} ms; verify cost v_k: {verify}", flush=True)

    table = []
    for subset, milliseconds in draft_ms.items():
        adapted = subset in results
        acceptance = results[subset]["trained_agreement"] if adapted else untrained[subset]
        cost = milliseconds / decode
        best_k = max(verify, key=lambda k: expected_speedup(acceptance, cost, verify[k], k))
        table.append(
            DraftChoice(
                subset,
                f"{ADAPTER_KIND} rank {args.rank}" if adapted else "none",
                acceptance,
                cost,
                best_k,
                expected_speedup(acceptance, cost, verify[best_k], best_k),
            )
        )
    print(
        markdown_table(
            ["layers", "adapter", "agreement", "draft cost / target step", "best k", "expected speed-up"],
            [
                [
                    describe_layers(r.layers),
                    r.adapter,
                    f"{r.agreement:.3f}",
                    f"{r.cost_ratio:.3f}",
                    r.best_k,
                    f"{r.expected_speedup:.2f}",
                ]
                for r in table
            ],
        )
    )
    chosen_row = max((r for r in table if r.layers in adapters), key=lambda r: r.expected_speedup)
    chosen = chosen_row.layers
    name = (
        f"{loaded.card.id}.layers-{describe_layers(chosen).replace(',', '+')}.swiglu{args.rank}.safetensors"
    )
    total_seconds = time.perf_counter() - started
    save_draft(
        args.out / name,
        adapters[chosen],
        chosen,
        loaded.card.id,
        config_fingerprint(target.config),
        {
            "training_command": shlex.join(["python", *sys.argv]),
            "data": {
                "prompts": len(prompts),
                "train_prompts": len(train_prompts),
                "held_out_prompts": len(test_prompts),
                "teacher_sequences": len(examples),
                "train_positions": len(training.teacher),
                "held_out_positions": len(held_out.teacher),
                "max_tokens": args.max_tokens,
            },
            "training": {
                "rank": args.rank,
                "steps": args.steps,
                "batch": args.batch,
                "lr": args.lr,
                "seed": args.seed,
            },
            "held_out_agreement": {
                "untrained": round(untrained[chosen], 4),
                "trained": round(results[chosen]["trained_agreement"], 4),
            },
            "cost_ratio": round(chosen_row.cost_ratio, 3),
            "expected_speedup": round(chosen_row.expected_speedup, 3),
        },
    )
    report = {
        "untrained": {describe_layers(s): a for s, a in untrained.items()},
        "trained": {describe_layers(s): r for s, r in results.items()},
        "target_decode_ms": target_ms,
        "verify_cost": verify,
        "table": [r.__dict__ | {"layers": describe_layers(r.layers)} for r in table],
        "chosen": name,
        "data_seconds": data_seconds,
        "total_seconds": total_seconds,
    }
    (args.work / "report.json").write_text(json.dumps(report, indent=1))
    print(f"\nchose {name} ({(args.out / name).stat().st_size} bytes), {total_seconds:.0f} s in all")


if __name__ == "__main__":
    main()
