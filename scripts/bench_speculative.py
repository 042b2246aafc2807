"""Big–little strategies against plain decoding on the same model, prompts and batch sizes.

Each configuration — a strategy (speculative, bild, guided, routed), a drafter (prompt lookup, a
self-draft of the model's own layers, another checkpoint) and its knobs (k, BiLD's α_FB/α_RB, guided
K, the routing threshold) — runs a prompt set greedily through the engine; batch 1 runs the prompts
one at a time, batch B runs them B at a time in one continuous batch. Reported per configuration:
tokens/s and the wall-clock speed-up over plain decoding in the same run, the acceptance rate and
mean tokens each sequence gains per big-model forward, how many requests the small model answered,
and the quality of the output against the big model's own greedy output (identical or not, token
agreement position by position, ROUGE-L F1 over tokens). Prints a markdown table, writes JSON and PNGs.

    python scripts/bench_speculative.py --drafts prompt-lookup self:0-7 --json out/bench_speculative.json \\
        --plot out/bench_speculative.png

The prompt set mixes tasks whose answers copy from the prompt (editing, extraction, repetition: where
prompt lookup pays) with open-ended ones; both are reported.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ttedge.bootstrap import LoadedEngine, load_engine
from ttedge.collab.draft_models import build_drafter, parse_draft_spec
from ttedge.collab.drafters import Drafter
from ttedge.collab.model_drafter import ModelDrafter
from ttedge.collab.strategies import CollabConfig, Route, Strategy
from ttedge.config import EngineSettings
from ttedge.engine.engine import Engine
from ttedge.engine.sampling import SamplingParams
from ttedge.runtime.base import ModelRunner
from ttedge.runtime.cpu import CpuModelRunner

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


@dataclass(frozen=True)
class Setting:
    strategy: Strategy
    draft: str = ""  # a --draft spec; "" for plain decoding
    num_draft_tokens: int = 4
    fallback_threshold: float = 0.5
    rollback_threshold: float = 2.0
    guided_tokens: int = 8
    route_threshold: float = 0.6

    @property
    def label(self) -> str:
        knob = {
            Strategy.PLAIN: "",
            Strategy.SPECULATIVE: f"k={self.num_draft_tokens}",
            Strategy.BILD: (
                f"k≤{self.num_draft_tokens} α_FB={self.fallback_threshold} α_RB={self.rollback_threshold}"
            ),
            Strategy.GUIDED: f"K={self.guided_tokens}",
            Strategy.ROUTED: f"τ={self.route_threshold}",
        }[self.strategy]
        return " ".join(p for p in (self.strategy.value, self.draft, knob) if p)


@dataclass
class Run:
    category: str
    batch: int
    setting: str
    strategy: str
    seconds: float
    output_tokens: int
    tokens_per_s: float
    # Tokens/s against plain decoding's at the same batch and category (lossy strategies write answers
    # of other lengths, so time alone would mislead).
    speedup: float
    acceptance_rate: float
    tokens_per_forward: float  # tokens each sequence gains per big-model forward while decoding
    answered_by_small: int  # requests whose tokens the small model wrote alone (after guidance)
    identical_to_plain: bool
    token_agreement: float  # position by position, against plain greedy, over the longer output
    rouge_l: float  # F1 of the longest common token subsequence, mean over requests


def rouge_l(candidate: list[int], reference: list[int]) -> float:
    if not candidate or not reference:
        return float(candidate == reference)
    previous = [0] * (len(reference) + 1)
    for token in candidate:
        current = [0]
        for j, ref in enumerate(reference):
            current.append(previous[j] + 1 if token == ref else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(candidate), lcs / len(reference)
    return 2 * precision * recall / (precision + recall)


def agreement(candidate: list[int], reference: list[int]) -> float:
    same = sum(a == b for a, b in zip(candidate, reference, strict=False))
    return same / max(len(candidate), len(reference), 1)


def make_engine(
    loaded: LoadedEngine, setting: Setting, drafters: dict[str, ModelDrafter | Drafter]
) -> Engine:
    """The engine ``setting`` describes, over the loaded big model; plain with a draft named is the
    small model alone, the quality floor of the lossy strategies."""
    base = loaded.engine
    runner: ModelRunner = base.runner
    collab = None
    if setting.strategy is Strategy.PLAIN and setting.draft:
        drafter = drafters[setting.draft]
        assert isinstance(drafter, ModelDrafter)
        runner = drafter.runner
    elif setting.strategy is not Strategy.PLAIN:
        collab = CollabConfig(
            drafters[setting.draft],
            default_strategy=setting.strategy,
            num_draft_tokens=setting.num_draft_tokens,
            fallback_threshold=setting.fallback_threshold,
            rollback_threshold=setting.rollback_threshold,
            guided_tokens=setting.guided_tokens,
            route_threshold=setting.route_threshold,
        )
    return Engine(
        runner, base.text_stream_factory, tuple(base.eos_token_ids), base.scheduler.config, collab=collab
    )


def run(
    engine: Engine, prompts: list[list[int]], batch: int, max_tokens: int
) -> tuple[float, list[list[int]], int, int]:
    """Seconds, outputs, big-model decode rows and requests the small model answered alone."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    outputs: list[list[int]] = []
    decode_rows = answered_by_small = 0
    started = time.perf_counter()
    for first in range(0, len(prompts), batch):
        seqs = [engine.add_request(p, params) for p in prompts[first : first + batch]]
        while engine.has_unfinished():
            chunks = engine.scheduler.schedule()
            decode_rows += sum(
                1 for c in chunks if c.num_tokens == 1 and c.completes_sequence and not c.seq.on_small_model
            )
            engine.execute(chunks)
        outputs += [s.output_ids for s in seqs]
        answered_by_small += sum(s.on_small_model or s.route is Route.SMALL for s in seqs)
    return time.perf_counter() - started, outputs, decode_rows, answered_by_small


def settings_from(args: argparse.Namespace) -> list[Setting]:
    settings = [Setting(Strategy.PLAIN)]
    for draft in args.drafts:
        for k in args.draft_tokens:
            settings.append(Setting(Strategy.SPECULATIVE, draft, num_draft_tokens=k))
        if not parse_draft_spec(draft).needs_model:
            continue
        settings.append(Setting(Strategy.PLAIN, draft))  # the small model alone: the quality floor
        for rollback in args.rollback_thresholds:
            settings.append(
                Setting(
                    Strategy.BILD, draft, num_draft_tokens=max(args.draft_tokens), rollback_threshold=rollback
                )
            )
        for tokens in args.guided_tokens:
            settings.append(Setting(Strategy.GUIDED, draft, guided_tokens=tokens))
        for threshold in args.route_thresholds:
            settings.append(Setting(Strategy.ROUTED, draft, route_threshold=threshold))
    return settings


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--drafts", nargs="+", default=["prompt-lookup"], help="--draft specs to compare")
    parser.add_argument("--draft-tokens", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--rollback-thresholds", type=float, nargs="*", default=[1.0, 3.0])
    parser.add_argument("--guided-tokens", type=int, nargs="*", default=[16])
    parser.add_argument("--route-thresholds", type=float, nargs="*", default=[0.6])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--categories", nargs="+", choices=sorted(PROMPTS), default=sorted(PROMPTS))
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--weights", default="auto")
    parser.add_argument("--model")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()

    loaded = load_engine(
        EngineSettings(model=args.model, weight_format=args.weights, max_num_seqs=max(args.batches))
    )
    runner = loaded.engine.runner
    assert isinstance(runner, CpuModelRunner), "the benchmark runs the CPU backend"
    drafters = {
        draft: build_drafter(
            parse_draft_spec(draft),
            loaded.checkpoint,
            runner.model,
            args.weights,
            runner.allocator.num_blocks,
        )
        for draft in args.drafts
    }

    def chat(text: str) -> list[int]:
        return loaded.tokenizer.encode_chat([{"role": "user", "content": text}])

    settings = settings_from(args)
    run(make_engine(loaded, settings[0], drafters), [chat("Hi")], 1, 4)  # warm-up
    results: list[Run] = []
    for category in args.categories:
        prompts = [chat(t) for t in PROMPTS[category]]
        for batch in args.batches:
            reference: list[list[int]] = []
            plain_rate = 0.0
            for setting in settings:
                engine = make_engine(loaded, setting, drafters)
                seconds, outputs, forwards, by_small = run(engine, prompts, batch, args.max_tokens)
                small_alone = setting.strategy is Strategy.PLAIN and bool(setting.draft)
                counters = engine.stats().collab
                tokens = sum(map(len, outputs))
                if not reference:
                    reference, plain_rate = outputs, tokens / seconds
                results.append(
                    Run(
                        category=category,
                        batch=batch,
                        setting=f"small model alone ({setting.draft})" if small_alone else setting.label,
                        strategy=setting.strategy.value,
                        seconds=seconds,
                        output_tokens=tokens,
                        tokens_per_s=tokens / seconds,
                        speedup=tokens / seconds / plain_rate,
                        acceptance_rate=counters.accepted_draft_tokens / max(counters.draft_tokens, 1),
                        tokens_per_forward=tokens / max(forwards, 1),
                        answered_by_small=len(prompts) if small_alone else by_small,
                        identical_to_plain=outputs == reference,
                        token_agreement=sum(map(agreement, outputs, reference)) / len(outputs),
                        rouge_l=sum(map(rouge_l, outputs, reference)) / len(outputs),
                    )
                )
                print(
                    f"{category} batch {batch} {results[-1].setting}: x{results[-1].speedup:.2f}",
                    file=sys.stderr,
                )

    lines = [
        "| prompts | batch | setting | tok/s | speed-up | acceptance | tokens/forward | by small "
        "| same output | agreement | ROUGE-L |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.category} | {r.batch} | {r.setting} | {r.tokens_per_s:.1f} | {r.speedup:.2f} | "
            f"{r.acceptance_rate:.2f} | {r.tokens_per_forward:.2f} | {r.answered_by_small} | "
            f"{'yes' if r.identical_to_plain else 'no'} | {r.token_agreement:.2f} | {r.rouge_l:.2f} |"
        )
    print("\n".join(lines))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    if args.plot:
        plot(results, args.plot)


def plot(results: list[Run], path: Path) -> None:
    """Speed-up against quality (ROUGE-L against the big model's greedy output), one panel per batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r.batch for r in results})
    fig, axes = plt.subplots(1, len(batches), figsize=(6.5 * len(batches), 4.6), squeeze=False)
    markers = {"copy": "o", "open": "s"}
    for ax, batch in zip(axes[0], batches, strict=True):
        for r in results:
            if r.batch != batch:
                continue
            ax.scatter(r.speedup, r.rouge_l, marker=markers.get(r.category, "x"), s=30)
            ax.annotate(f"{r.category}: {r.setting}", (r.speedup, r.rouge_l), fontsize=6, alpha=0.8)
        ax.axvline(1.0, color="grey", lw=0.8)
        ax.set_xlabel("speed-up over plain decoding")
        ax.set_ylabel("ROUGE-L against the big model's greedy output")
        ax.set_title(f"big–little strategies, batch {batch} (o copy, □ open prompts)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
