"""Speculative decoding against plain decoding on the same model, prompts and batch sizes.

For each drafter setting (number of draft tokens k) and batch size, runs a prompt set greedily through
the engine with and without speculation, checks that the outputs are identical, and reports tokens/s,
the wall-clock speed-up, the acceptance rate (accepted / verified drafts) and the mean number of tokens
each sequence gains per forward of the big model. Batch 1 runs the prompts one at a time; batch B runs
them B at a time in one continuous batch. Prints a markdown table, writes JSON and a PNG.

    python scripts/bench_speculative.py --json out/bench_speculative.json --plot out/bench_speculative.png

The prompt set mixes tasks whose answers copy from the prompt (editing, extraction, repetition: where
prompt lookup pays) with open-ended ones (where it should cost little); both are reported.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ttedge.bootstrap import LoadedEngine, load_engine
from ttedge.collab.drafters import PromptLookupDrafter
from ttedge.collab.speculative import SpeculativeConfig
from ttedge.config import EngineSettings
from ttedge.engine.engine import Engine
from ttedge.engine.sampling import SamplingParams

PASSAGE = (
    "The lighthouse keeper climbed the stairs every evening at dusk. He wound the clockwork, cleaned "
    "the lens and lit the lamp, then sat by the window and wrote the weather in his log."
)
CODE = "def total(xs):\n    s = 0\n    for x in xs:\n        s = s + x\n    return s\n"
PROMPTS = {
    "copy": [
        f"Repeat the following text exactly:\n\n{PASSAGE}",
        f"Rewrite this text in the past perfect tense:\n\n{PASSAGE}",
        f"Fix the spelling: Teh lighthouse keper climbed teh stairs evry evening at dusk. {PASSAGE}",
        f"Rename the variable s to running_sum in this Python function:\n\n{CODE}",
        f"Add a docstring to this Python function and return the whole function:\n\n{CODE}",
        "Continue the sequence: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,",
        f"List every noun in this text, one per line:\n\n{PASSAGE}",
        f"Translate to simple English, keeping the sentences:\n\n{PASSAGE}",
    ],
    "open": [
        "Write a short poem about the sea.",
        "Give three tips for a job interview.",
        "Why do cats purr?",
        "Describe a busy market in the morning.",
        "What is the difference between weather and climate?",
        "Invent a name and a slogan for a bakery.",
        "Explain what a compiler does.",
        "Tell me a fun fact about octopuses.",
    ],
}


@dataclass
class Run:
    category: str
    batch: int
    num_draft_tokens: int  # 0 = plain decoding
    seconds: float
    output_tokens: int
    tokens_per_s: float
    speedup: float  # against plain decoding at the same batch and category
    acceptance_rate: float
    tokens_per_forward: float  # tokens each sequence gains per big-model forward while decoding
    identical_to_plain: bool


def run(
    loaded: LoadedEngine,
    prompts: list[list[int]],
    batch: int,
    num_draft_tokens: int,
    max_tokens: int,
    adaptive: bool = True,
) -> tuple[float, list[list[int]], Engine, int]:
    base = loaded.engine
    speculative = None
    if num_draft_tokens:
        speculative = SpeculativeConfig(PromptLookupDrafter(), num_draft_tokens, adaptive=adaptive)
    engine = Engine(
        base.runner,
        base.text_stream_factory,
        tuple(base.eos_token_ids),
        base.scheduler.config,
        speculative=speculative,
    )
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    outputs: list[list[int]] = []
    decode_participations = 0
    started = time.perf_counter()
    for first in range(0, len(prompts), batch):
        seqs = [engine.add_request(p, params) for p in prompts[first : first + batch]]
        while engine.has_unfinished():
            chunks = engine.scheduler.schedule()
            decode_participations += sum(1 for c in chunks if c.num_tokens == 1 and c.completes_sequence)
            engine.execute(chunks)
        outputs += [s.output_ids for s in seqs]
    return time.perf_counter() - started, outputs, engine, decode_participations


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--draft-tokens", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--weights", default="auto")
    parser.add_argument("--model")
    parser.add_argument("--fixed-k", action="store_true", help="verify k drafts every step, never fewer")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()

    loaded = load_engine(
        EngineSettings(model=args.model, weight_format=args.weights, max_num_seqs=max(args.batches))
    )
    tokenizer = loaded.tokenizer

    def chat(text: str) -> list[int]:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}])
        return tokenizer.encode(rendered, add_bos=False)

    run(loaded, [chat("Hi")], 1, 0, 4)  # warm-up
    results: list[Run] = []
    for category, texts in PROMPTS.items():
        prompts = [chat(t) for t in texts]
        for batch in args.batches:
            plain_seconds, plain_outputs, _, plain_forwards = run(loaded, prompts, batch, 0, args.max_tokens)
            tokens = sum(map(len, plain_outputs))
            plain_run = Run(category, batch, 0, plain_seconds, tokens, tokens / plain_seconds, 1.0, 0.0,
                            tokens / max(plain_forwards, 1), True)  # fmt: skip
            results.append(plain_run)
            for k in args.draft_tokens:
                seconds, outputs, engine, forwards = run(
                    loaded, prompts, batch, k, args.max_tokens, adaptive=not args.fixed_k
                )
                tokens = sum(map(len, outputs))
                stats = engine.stats()
                results.append(
                    Run(
                        category=category,
                        batch=batch,
                        num_draft_tokens=k,
                        seconds=seconds,
                        output_tokens=tokens,
                        tokens_per_s=tokens / seconds,
                        speedup=plain_seconds / seconds,
                        acceptance_rate=stats.accepted_draft_tokens / max(stats.draft_tokens, 1),
                        tokens_per_forward=tokens / max(forwards, 1),
                        identical_to_plain=outputs == plain_outputs,
                    )
                )
                print(f"{category} batch {batch} k={k}: x{results[-1].speedup:.2f}", file=sys.stderr)

    lines = [
        "| prompts | batch | draft tokens k | tok/s | speed-up | acceptance | tokens per forward "
        "| same output |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        k = "plain" if r.num_draft_tokens == 0 else str(r.num_draft_tokens)
        acceptance = "" if r.num_draft_tokens == 0 else f"{r.acceptance_rate:.2f}"
        lines.append(
            f"| {r.category} | {r.batch} | {k} | {r.tokens_per_s:.1f} | {r.speedup:.2f} | {acceptance} | "
            f"{r.tokens_per_forward:.2f} | {'yes' if r.identical_to_plain else 'NO'} |"
        )
    print("\n".join(lines))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    if args.plot:
        plot(results, args.plot)


def plot(results: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for category in PROMPTS:
        for batch in sorted({r.batch for r in results}):
            runs = [r for r in results if r.category == category and r.batch == batch and r.num_draft_tokens]
            ax.plot([r.num_draft_tokens for r in runs], [r.speedup for r in runs], marker="o",
                    label=f"{category} prompts, batch {batch}")  # fmt: skip
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("draft tokens per step (k)")
    ax.set_ylabel("speed-up over plain decoding")
    ax.set_title("prompt-lookup speculative decoding (greedy, identical output)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
