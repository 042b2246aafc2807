"""Build a prompt set, label it with SmolLM2's own greedy response lengths, fit the response-length
predictor, and compare it with the alternatives on held-out prompts.

    python scripts/train_length_predictor.py [--work out/length_predictor] [--feature last_hidden]

1. Prompts: 50 templates of 8 kinds (facts, yes/no, lists, stories and poems, explanations, code,
   translations, writing tasks), up to 10 fillings each, from a fixed seed: 486 prompts.
2. Labels: each prompt's greedy response under the chat template (max 256 tokens) through the engine
   with the default int4 weights, as served; the length counts the end-of-turn token.
3. Representations, from one prefill of each prompt: the final-norm hidden state of its last token
   (what the engine's prefill computes for the first sampled token anyway), the final-norm hidden
   states averaged over the user's message, and its input embeddings averaged (no forward at all).
4. The model's own estimate: asked to state its response length in words first (test split only).
5. Ridge on log length for each representation, its strength by 5-fold cross-validation on the
   training split; MAE in tokens on the held-out 20% and on templates never seen in training.

Labels, representations and estimates are cached in --work, so a rerun only refits; the comparison goes
to stdout and --work/report.json, the chosen regressor to --out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re
import string
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ttedge.bootstrap import LoadedEngine, load_engine
from ttedge.config import EngineSettings
from ttedge.engine.length_predictor import DEFAULT_WEIGHTS, LengthPredictor
from ttedge.engine.sampling import SamplingParams
from ttedge.engine.sequence import FinishReason, Sequence
from ttedge.models.llama.batch import BatchLayout, SequenceChunk
from ttedge.runtime.cpu import CpuModelRunner
from ttedge.runtime.kv_cache import blocks_needed
from ttedge.tokenizer import Tokenizer

# Fillers for the templates' {slots}, "|"-separated.
_SLOT_TEXT = {
    "country": (
        "France|Japan|Brazil|Kenya|Canada|Italy|Egypt|India|Norway|Mexico|Australia|Germany|"
        "Spain|Peru|Vietnam|Greece"
    ),
    "animal": (
        "cat|spider|horse|octopus|penguin|ant|dolphin|eagle|snake|frog|bee|elephant|owl|rabbit|whale|crab"
    ),
    "element": "gold|oxygen|iron|sodium|carbon|helium|silver|copper|neon|lead",
    "book": (
        "Hamlet|Pride and Prejudice|1984|Don Quixote|The Odyssey|Moby Dick|War and Peace|"
        "Frankenstein|The Hobbit|Les Misérables"
    ),
    "phenomenon": (
        "photosynthesis|a rainbow|the tides|an earthquake|a volcano|thunder|the seasons|"
        "a solar eclipse|lightning|the water cycle|digestion|a vaccine|a refrigerator|"
        "a jet engine|the internet|a battery|a compass|GPS"
    ),
    "concept": (
        "gravity|inflation|democracy|evolution|recursion|machine learning|entropy|"
        "supply and demand|the immune system|blockchain|black holes|compound interest|"
        "climate change|DNA|electricity|the stock market|encryption|relativity"
    ),
    "topic": (
        "the ocean|autumn|friendship|a city at night|the moon|a lost key|winter mornings|"
        "an old lighthouse|coffee|the first day of school|rain|mountains|a train journey|"
        "a garden|time|a forgotten toy"
    ),
    "character": (
        "a young wizard|a brave knight|a curious robot|a lonely dragon|a clever fox|"
        "a little girl named Mia|an old fisherman|a space explorer|a talking tree|a shy ghost|"
        "a detective|a baker"
    ),
    "plot": (
        "finds a secret door|loses their way home|learns to fly|discovers a hidden treasure|"
        "makes an unlikely friend|must save the village|travels back in time|wins a great race"
    ),
    "things": (
        "fruits|colors|countries in Europe|programming languages|musical instruments|vegetables|"
        "planets|sports|birds|famous painters|kitchen tools|board games|rivers|mammals|"
        "capital cities|flowers"
    ),
    "activity": (
        "learning a new language|sleeping better|saving money|studying for exams|staying healthy|"
        "writing an essay|starting a garden|running a marathon|public speaking|working from home|"
        "making friends|cooking pasta"
    ),
    "code_task": (
        "reverses a string|checks whether a number is prime|computes the factorial of n|"
        "sorts a list of numbers|counts the vowels in a string|"
        "returns the largest element of a list|checks whether a word is a palindrome|"
        "computes the nth Fibonacci number|removes duplicates from a list|"
        "converts Celsius to Fahrenheit|merges two sorted lists|finds the average of a list"
    ),
    "lang": "Python|JavaScript|C|Java|Rust|Go",
    "phrase": (
        "good morning|thank you very much|where is the train station|I love you|happy birthday|"
        "how are you|the cat is sleeping|see you tomorrow|I am hungry|what time is it|"
        "the weather is nice today|my name is Anna"
    ),
    "language": "French|Spanish|German|Italian|Portuguese|Japanese|Chinese|Russian",
    "languages": (
        "French and Spanish|German, Italian and Dutch|Japanese and Chinese|"
        "Spanish, Portuguese and Italian|Russian and Polish|French, German and Swedish"
    ),
    "number": "7|12|15|21|29|37|49|51|97|100|113|121",
    "sum": ("2 plus 2|17 plus 25|9 times 8|100 minus 37|12 times 12|144 divided by 12|3 plus 4|250 plus 250"),
    "n": "3|5|10|two|four|seven",
    "people": "scientists|inventors|writers|composers|explorers|athletes|philosophers|painters",
    "pair": (
        "cats and dogs|tea and coffee|summer and winter|books and movies|Python and Java|"
        "trains and planes|the sun and the moon|cities and villages"
    ),
    "claim": (
        "a tomato a fruit|a whale a fish|a bat a bird|Pluto a planet|the sun a star|"
        "a spider an insect|a penguin a bird|glass a liquid|a peanut a nut|a dolphin a mammal"
    ),
    "month": "January|February|April|June|September|December",
    "person": "my boss|a friend|my landlord|a teacher|a customer|my neighbour",
    "reason": ("a late payment|a birthday party|a missed meeting|a broken window|a job offer|a holiday plan"),
    "subject": (
        "the Roman Empire|the printing press|the bicycle|the French Revolution|jazz|"
        "the telephone|chess|the Olympic Games|paper money|the steam engine"
    ),
    "product": (
        "water bottle|backpack|desk lamp|pair of running shoes|coffee mug|wireless mouse|umbrella|notebook"
    ),
}
SLOTS = {name: text.split("|") for name, text in _SLOT_TEXT.items()}

# (kind, template): every {slot} is filled from SLOTS.
TEMPLATES: list[tuple[str, str]] = [
    ("fact", "What is the capital of {country}?"),
    ("fact", "Who wrote {book}?"),
    ("fact", "What is the chemical symbol for {element}?"),
    ("fact", "How many legs does a {animal} have?"),
    ("fact", "What is {sum}?"),
    ("fact", "What is the official language of {country}?"),
    ("fact", "How many days are there in {month}?"),
    ("fact", "What continent is {country} in? Answer in one word."),
    ("yesno", "Is {claim}? Answer yes or no."),
    ("yesno", "Is {number} a prime number? Just answer yes or no."),
    ("yesno", "Can a {animal} swim?"),
    ("yesno", "Is {country} in Europe?"),
    ("yesno", "Is {claim}? Explain your answer."),
    ("list", "List {n} {things}."),
    ("list", "Name {n} famous {people}."),
    ("list", "Give me {n} tips for {activity}."),
    ("list", "List {n} {things}, with one sentence about each."),
    ("list", "Give me a list of things to pack for a trip to {country}."),
    ("list", "What are the most popular dishes in {country}?"),
    ("story", "Write a short story about {character} who {plot}."),
    ("story", "Tell me a bedtime story about a {animal}."),
    ("story", "Write a poem about {topic}."),
    ("story", "Write a haiku about {topic}."),
    ("story", "Write a long, detailed story about {character} who {plot}."),
    ("story", "Write a limerick about a {animal}."),
    ("story", "Write the opening paragraph of a novel about {character}."),
    ("explain", "Explain how {phenomenon} works."),
    ("explain", "Explain {concept} to a five-year-old."),
    ("explain", "Explain {concept} in one sentence."),
    ("explain", "Describe in detail the history of {subject}."),
    ("explain", "What is {concept}?"),
    ("explain", "Why does {phenomenon} happen? Keep it short."),
    ("explain", "Compare {pair}."),
    ("explain", "What are the pros and cons of {activity}?"),
    ("explain", "Write an essay about {concept}."),
    ("code", "Write a Python function that {code_task}."),
    ("code", "Write a {lang} program that {code_task}."),
    ("code", "Write a one-line Python expression that {code_task}."),
    ("code", "Explain what a for loop is in {lang}."),
    ("code", "Write a {lang} function that {code_task}, with comments and an example."),
    ("translate", "Translate '{phrase}' into {language}."),
    ("translate", "How do you say '{phrase}' in {language}?"),
    ("translate", "Translate '{phrase}' into {language} and explain the grammar."),
    ("translate", "Translate '{phrase}' into {languages}."),
    ("write", "Write an email to {person} about {reason}."),
    ("write", "Write a one-sentence summary of {book}."),
    ("write", "Summarize the plot of {book}."),
    ("write", "Write a product description for a {product}."),
    ("write", "Write a short text message to {person} about {reason}."),
    ("write", "Give me a motivational quote about {activity}."),
]


@dataclass(frozen=True)
class Prompt:
    kind: str
    template: int  # index into TEMPLATES; prompts of one template form one group for cross-validation
    text: str


def build_prompts(per_template: int = 10, seed: int = 0) -> list[Prompt]:
    """``per_template`` distinct fillings of every template, in a fixed order."""
    rng = random.Random(seed)
    prompts = []
    for index, (kind, template) in enumerate(TEMPLATES):
        names = sorted({name for _, name, _, _ in string.Formatter().parse(template) if name})
        combos = list(itertools.product(*(SLOTS[n] for n in names)))
        for combo in rng.sample(combos, min(per_template, len(combos))):
            prompts.append(Prompt(kind, index, template.format(**dict(zip(names, combo, strict=True)))))
    return prompts


def split(num_prompts: int, test_fraction: float = 0.2, seed: int = 1) -> tuple[list[int], list[int]]:
    """Indices of the training and the held-out test prompts."""
    order = list(range(num_prompts))
    random.Random(seed).shuffle(order)
    cut = round(num_prompts * test_fraction)
    return sorted(order[cut:]), sorted(order[:cut])


def user_span(tokenizer: Tokenizer, ids: list[int]) -> tuple[int, int]:
    """Where the user's message lies in a chat prompt: what differs from the empty message's prompt."""
    empty = tokenizer.encode_chat([{"role": "user", "content": ""}])
    head = next(i for i, (a, b) in enumerate(zip(ids, empty, strict=False)) if a != b)
    tail = next(i for i, (a, b) in enumerate(zip(ids[::-1], empty[::-1], strict=False)) if a != b)
    return head, len(ids) - tail


def generate(loaded: LoadedEngine, prompts: list[list[int]], max_tokens: int) -> list[Sequence]:
    """Greedy responses, batched by the engine's continuous batching."""
    return loaded.engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens))


def label(
    loaded: LoadedEngine, prompts: list[Prompt], max_tokens: int, batch: int = 64
) -> list[dict[str, object]]:
    """Each prompt's greedy response length. At int4 a response can depend on which other sequences
    share its batches (rounding differs with the batch shape), so the batching here is fixed."""
    started = time.perf_counter()
    rows: list[dict[str, object]] = []
    for first in range(0, len(prompts), batch):
        part = prompts[first : first + batch]
        seqs = generate(
            loaded,
            [loaded.tokenizer.encode_chat([{"role": "user", "content": p.text}]) for p in part],
            max_tokens,
        )
        rows.extend(
            {
                **asdict(p),
                "length": len(s.output_ids),
                "truncated": s.finish_reason is FinishReason.LENGTH,
                "response": s.text,
            }
            for p, s in zip(part, seqs, strict=True)
        )
        print(f"labels: {len(rows)}/{len(prompts)} after {time.perf_counter() - started:.0f} s", flush=True)
    return rows


def hidden_representations(
    loaded: LoadedEngine, prompts: list[Prompt], batch: int = 16
) -> dict[str, np.ndarray]:
    """The final-norm hidden states of one prefill of each chat prompt: its last token's (the row the
    engine's prefill turns into the first token's logits) and their mean over the user's message."""
    runner = loaded.engine.runner
    if not isinstance(runner, CpuModelRunner):
        raise TypeError("hidden states are read from the CPU runner's reference model")
    tokenizer = loaded.tokenizer
    last, mean = [], []
    for first in range(0, len(prompts), batch):
        ids = [
            tokenizer.encode_chat([{"role": "user", "content": p.text}])
            for p in prompts[first : first + batch]
        ]
        tables = [runner.allocator.allocate(blocks_needed(len(x))) for x in ids]
        try:
            layout = BatchLayout.build(
                [SequenceChunk(0, len(x), t, all_logits=True) for x, t in zip(ids, tables, strict=True)]
            )
            flat = torch.tensor([t for x in ids for t in x], dtype=torch.long)
            hidden = runner.model.final_hidden(flat, layout, runner.cache).float()
        finally:
            for table in tables:
                runner.allocator.free(table)
        for x, rows in zip(ids, hidden.split([len(x) for x in ids]), strict=True):
            start, end = user_span(tokenizer, x)
            last.append(rows[-1].numpy())
            mean.append(rows[start:end].mean(0).numpy())
    return {"last_hidden": np.stack(last), "mean_hidden": np.stack(mean)}


def embedding_table(loaded: LoadedEngine) -> np.ndarray:
    runner = loaded.engine.runner
    if not isinstance(runner, CpuModelRunner):
        raise TypeError("the embedding table is read from the CPU runner's reference model")
    return runner.model.embed.float().numpy()


FEATURES = {
    "mean_embedding": "input embeddings averaged over the whole prompt (no forward; the shipped one)",
    "last_hidden": "final-norm hidden state of the prompt's last token (needs the prefill)",
    "mean_hidden": "final-norm hidden states averaged over the user's message (needs the prefill)",
    "prompt_length": "log of the prompt's token count",
}

SELF_ESTIMATE_SUFFIX = (
    "\n\nBefore answering, estimate the length of your response in words. Reply with only the number."
)


def self_estimates(loaded: LoadedEngine, prompts: list[Prompt]) -> list[int | None]:
    """The model's own estimate of its response length in words, or None when it gives no number."""
    ids = [
        loaded.tokenizer.encode_chat([{"role": "user", "content": p.text + SELF_ESTIMATE_SUFFIX}])
        for p in prompts
    ]
    estimates: list[int | None] = []
    for seq in generate(loaded, ids, max_tokens=12):
        found = re.search(r"\d+", seq.text.replace(",", ""))
        estimates.append(int(found.group()) if found else None)
    return estimates


def fit_ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    mean = x.mean(0)
    scale = x.std(0) + 1e-6
    z = (x - mean) / scale
    weights = np.linalg.solve(z.T @ z + alpha * np.eye(z.shape[1]), z.T @ (y - y.mean()))
    return mean, scale, weights, float(y.mean())


def predict_tokens(
    model: tuple[np.ndarray, np.ndarray, np.ndarray, float], x: np.ndarray, cap: int
) -> np.ndarray:
    mean, scale, weights, bias = model
    return np.exp(np.clip((x - mean) / scale @ weights + bias, 0.0, np.log(cap)))


def choose_alpha(x: np.ndarray, y_tokens: np.ndarray, cap: int, folds: int = 5, seed: int = 2) -> float:
    """The ridge strength with the lowest cross-validated MAE in tokens."""
    fold_of = np.random.default_rng(seed).permutation(len(y_tokens)) % folds
    best = (np.inf, 0.0)
    for alpha in ALPHAS:
        errors = []
        for k in range(folds):
            train, test = fold_of != k, fold_of == k
            model = fit_ridge(x[train], np.log(y_tokens[train]), alpha)
            errors.append(np.abs(predict_tokens(model, x[test], cap) - y_tokens[test]))
        best = min(best, (float(np.concatenate(errors).mean()), alpha))
    return best[1]


ALPHAS = [0.1, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0]


def grouped_mae(x: np.ndarray, y: np.ndarray, groups: np.ndarray, cap: int, folds: int = 5) -> float:
    """MAE on templates never seen in training: folds of whole templates, alpha chosen inside each."""
    template_fold = {
        g: i % folds for i, g in enumerate(np.random.default_rng(3).permutation(np.unique(groups)))
    }
    fold_of = np.array([template_fold[g] for g in groups])
    errors = []
    for k in range(folds):
        train, test = fold_of != k, fold_of == k
        alpha = choose_alpha(x[train], y[train], cap)
        model = fit_ridge(x[train], np.log(y[train]), alpha)
        errors.append(np.abs(predict_tokens(model, x[test], cap) - y[test]))
    return float(np.concatenate(errors).mean())


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation: what shortest-first ordering needs from a predictor, more than small errors."""
    ranks_a, ranks_b = a.argsort().argsort(), b.argsort().argsort()
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=Path("out/length_predictor"))
    parser.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS)
    parser.add_argument("--weights", default="int4", help="CPU weight format of the labelling model")
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    loaded = load_engine(EngineSettings(weight_format=args.weights, max_num_seqs=32, kv_cache_mb=320))
    prompts = build_prompts()
    train, test = split(len(prompts))
    ids = [loaded.tokenizer.encode_chat([{"role": "user", "content": p.text}]) for p in prompts]

    labels_path = args.work / f"labels_{args.weights}_{args.max_tokens}.json"
    if not labels_path.exists():
        labels_path.write_text(json.dumps(label(loaded, prompts, args.max_tokens), indent=1))
    labels = json.loads(labels_path.read_text())
    if [r["text"] for r in labels] != [p.text for p in prompts]:
        raise SystemExit(f"{labels_path} was made for another prompt set; delete it")
    y = np.array([r["length"] for r in labels], dtype=np.float64)
    groups = np.array([p.template for p in prompts])

    hidden_path = args.work / f"hidden_{args.weights}.npz"
    if not hidden_path.exists():
        np.savez(hidden_path, **hidden_representations(loaded, prompts))
    embedding = embedding_table(loaded)
    with np.load(hidden_path) as data:
        feats = {
            "mean_embedding": np.stack([embedding[x].mean(0) for x in ids]),
            "last_hidden": data["last_hidden"],
            "mean_hidden": data["mean_hidden"],
            "prompt_length": np.log([[len(x)] for x in ids]),
        }

    estimates_path = args.work / f"self_estimates_{args.weights}.json"
    if not estimates_path.exists():
        estimates_path.write_text(json.dumps(self_estimates(loaded, [prompts[i] for i in test])))
    words = json.loads(estimates_path.read_text())

    cap = args.max_tokens
    y_train, y_test = y[train], y[test]
    rows: list[dict[str, object]] = []

    def report(name: str, predicted: np.ndarray, unseen: float | None = None, **extra: object) -> None:
        rows.append(
            {
                "predictor": name,
                "test_mae_tokens": float(np.abs(predicted - y_test).mean()),
                "spearman": spearman(predicted, y_test) if predicted.std() > 0 else 0.0,
                "unseen_template_mae_tokens": unseen,
                **extra,
            }
        )

    no_features = np.zeros((len(y), 1))
    report(
        "training mean", np.full_like(y_test, y_train.mean()), unseen=grouped_mae(no_features, y, groups, cap)
    )
    report("training median", np.full_like(y_test, np.median(y_train)))
    # Words to tokens at the ratio of the model's own training-split responses.
    tokens_per_word = float(
        np.median([labels[i]["length"] / max(1, len(labels[i]["response"].split())) for i in train])
    )
    estimate = np.array([min(cap, w * tokens_per_word) if w is not None else y_train.mean() for w in words])
    report(
        "self-estimate (the model asked, words x tokens/word)",
        estimate,
        answered_with_a_number=float(np.mean([w is not None for w in words])),
    )
    ridges = {}
    for name, x in feats.items():
        alpha = choose_alpha(x[train], y_train, cap)
        ridges[name] = fit_ridge(x[train], np.log(y_train), alpha)
        report(
            f"ridge on {name}",
            predict_tokens(ridges[name], x[test], cap),
            unseen=grouped_mae(x, y, groups, cap),
            alpha=alpha,
        )

    mean, scale, weights, bias = ridges["mean_embedding"]
    test_mae = next(r["test_mae_tokens"] for r in rows if r["predictor"] == "ridge on mean_embedding")
    predictor = LengthPredictor.from_embedding_ridge(
        embedding,
        mean,
        scale,
        weights,
        bias,
        max_tokens=cap,
        metadata={
            "model": loaded.checkpoint.path.name,
            "weight_format": args.weights,
            "train_prompts": len(train),
            "test_mae_tokens": round(float(test_mae), 2),
            "trained_by": "scripts/train_length_predictor.py",
        },
    )
    # Folding the ridge into per-token scores must not change a single prediction.
    folded = np.exp(np.clip(predictor.predict_log([ids[i] for i in test]), 0.0, np.log(cap)))
    np.testing.assert_allclose(
        folded, predict_tokens(ridges["mean_embedding"], feats["mean_embedding"][test], cap), rtol=1e-3
    )
    predictor.save(args.out)
    summary = {
        "prompts": len(prompts),
        "train": len(train),
        "test": len(test),
        "max_tokens": cap,
        "weights": args.weights,
        "truncated_fraction": float(np.mean([r["truncated"] for r in labels])),
        "mean_length": float(y.mean()),
        "tokens_per_word": tokens_per_word,
        "rows": rows,
        "seconds": time.perf_counter() - started,
    }
    (args.work / "report.json").write_text(json.dumps(summary, indent=1))
    print(
        f"\n{len(prompts)} prompts ({len(train)} train / {len(test)} test), mean response "
        f"{y.mean():.1f} tokens, {summary['truncated_fraction']:.0%} cut at {cap}"
    )
    print("\n| predictor | test MAE (tokens) | Spearman | unseen-template MAE (tokens) |")
    print("|---|---|---|---|")
    for r in rows:
        unseen = r["unseen_template_mae_tokens"]
        print(
            f"| {r['predictor']} | {r['test_mae_tokens']:.1f} | {r['spearman']:.2f} | "
            f"{'' if unseen is None else f'{unseen:.1f}'} |"
        )
    print(f"\nsaved the mean-embedding ridge to {args.out} ({summary['seconds']:.0f} s in all)")


if __name__ == "__main__":
    main()
