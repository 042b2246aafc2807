"""Decode speed with the engine stepped on the thread that loaded the model, against a second thread.

``ttedge serve`` steps the engine on the main thread (``ttedge/server/serve.py``) because torch's OpenMP
runtime keeps a team of workers per thread that starts parallel work: a model loaded on one thread and
stepped on another makes two teams, and on a small machine OpenMP then parks its workers between the
thousands of small ops of a step. This measures that choice: the same greedy generation, alternately on
the main thread and on a fresh thread, in one process.

    python scripts/bench_engine_thread.py [--tokens 100] [--rounds 3]
"""

from __future__ import annotations

import argparse
import threading
import time

from ttedge.bootstrap import load_engine
from ttedge.config import EngineSettings
from ttedge.engine.sampling import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--weights", default="auto")
    args = parser.parse_args()

    loaded = load_engine(EngineSettings(weight_format=args.weights))
    prompt = loaded.tokenizer.encode("Tell me a story about a dragon")
    params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    loaded.engine.generate([prompt], SamplingParams(max_tokens=4))  # warm-up
    rates: dict[str, list[float]] = {"main thread": [], "second thread": []}

    def generate(label: str) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        loaded.engine.generate([prompt], params)
        wall = time.perf_counter() - wall
        rates[label].append(args.tokens / wall)
        print(f"{label}: {args.tokens / wall:.1f} tok/s, CPU/wall {(time.process_time() - cpu) / wall:.2f}")

    for _ in range(args.rounds):
        generate("main thread")
        other = threading.Thread(target=generate, args=("second thread",))
        other.start()
        other.join()
    best = {label: max(values) for label, values in rates.items()}
    ratio = best["main thread"] / best["second thread"]
    print(f"best: main {best['main thread']:.1f}, second {best['second thread']:.1f} tok/s ({ratio:.2f}x)")


if __name__ == "__main__":
    main()
