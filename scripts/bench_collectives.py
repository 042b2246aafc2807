"""Collective microbenchmarks on this machine (torch.distributed over gloo, loopback TCP) beside the
alpha-beta cost ``ttedge.ethernet_mesh.collectives`` models for the same collective and size on each TT
topology.

- gloo: process groups of each ``--ranks`` count on this machine (spawned processes, MASTER_ADDR
  127.0.0.1 and a free port, one torch thread per rank), timing all-reduce, all-gather and reduce-scatter
  over a sweep of message sizes (``--sizes``, float32) and the residual all-reduce of one Llama decode
  step (SmolLM2-135M and Llama-3.1-8B, batch 1 and 32, bfloat16 and float32, sizes from the model cards).
  Each case runs ``--warmup`` times untimed, then ``--repeats`` times, each after a barrier; one repeat
  lasts from the last rank's call to the last rank's return (all ranks read CLOCK_MONOTONIC, one clock on
  one machine, so the barrier's exit skew is not counted). Median and p90 over the repeats.
- Sizes are the full tensor (the gathered or the reduced one), as in ``collective_seconds``; all-gather and
  reduce-scatter round the element count up to a multiple of the rank count (``bytes`` in the JSON).
- gloo realises reduce-scatter as an all-reduce of a copy of the input, of which each rank keeps its
  chunk (ProcessGroupGloo::reduce_scatter_tensor_coalesced), so its times are an all-reduce's and more.
- Modelled: ``collective_seconds`` on each TT mesh at its own chip count (n300 2, T3K 8, Galaxy 32,
  p150x4 4) for the same collective and size.
- Fit: ``time = alpha + beta * bytes`` per rank count and collective over the float32 medians, least
  squares on relative error (the sizes span four decades), with the residuals that say how well that form
  fits gloo. The same fit of the modelled TT times recovers the model's own constants.

    python scripts/bench_collectives.py [--ranks 2 3 4] [--sizes 4096 ... 67108864] [--repeats 20]
        [--warmup 3] [--json out.json] [--plot docs/img/bench_collectives.png]

Run as a pytest-benchmark test too: ``python -m pytest scripts/bench_collectives.py --benchmark-enable``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import multiprocessing as mp
import os
import queue
import socket
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist

from ttedge.ethernet_mesh.collectives import Collective, CollectivePlan, plan_on_mesh
from ttedge.ethernet_mesh.topology import Mesh, get_mesh
from ttedge.model_zoo import find_card

TT_MESHES = ("n300", "t3k", "galaxy", "p150x4")
DEFAULT_SIZES = [4096 * 4**k for k in range(8)]  # 4 KiB .. 64 MiB
# The residual all-reduce of one decode step is batch x hidden x element size (ethernet_mesh.sharding).
DECODE_MODELS = {"SmolLM2-135M": "smollm2-135m-instruct", "Llama-3.1-8B": "llama-3.1-8b-instruct"}
DECODE_BATCHES = (1, 32)
DECODE_DTYPES = ("bfloat16", "float32")
SWEEP_DTYPE = "float32"
# A rank that waits this long in one collective has lost its peers: fail instead of hanging.
GROUP_TIMEOUT = timedelta(seconds=120)


@dataclass(frozen=True)
class Case:
    """One collective over a tensor of ``nominal_bytes`` (its full size) in ``dtype``."""

    collective: str  # a Collective value
    label: str  # "sweep", or the decode step it stands for
    dtype: str
    nominal_bytes: int

    def elements(self, ranks: int) -> int:
        """Elements of the full tensor: gathered and scattered tensors split evenly over the ranks."""
        count = math.ceil(self.nominal_bytes / getattr(torch, self.dtype).itemsize)
        if Collective(self.collective) is Collective.ALL_REDUCE:
            return count
        return math.ceil(count / ranks) * ranks


@dataclass(frozen=True)
class Fit:
    """``seconds = alpha_s + beta_s_per_byte * bytes``, and how far the points are from it."""

    alpha_s: float
    beta_s_per_byte: float
    median_relative_residual: float
    max_relative_residual: float
    points: int

    @property
    def bytes_per_s(self) -> float:
        return 1 / self.beta_s_per_byte if self.beta_s_per_byte > 0 else math.inf

    @property
    def crossover_bytes(self) -> float:
        """The size at which the bandwidth term equals the latency term (latency-bound below it)."""
        return self.alpha_s / self.beta_s_per_byte if self.beta_s_per_byte > 0 else math.inf


def fit_alpha_beta(sizes: Sequence[float], seconds: Sequence[float]) -> Fit:
    """Least squares on relative error: each point weighs 1 / its time, so the microsecond points count
    as much as the millisecond ones (plain least squares would leave alpha to the largest sizes' noise)."""
    if len(sizes) != len(seconds):
        raise ValueError(f"{len(sizes)} sizes but {len(seconds)} times")
    if len(set(sizes)) < 2:
        raise ValueError(
            f"fitting alpha and beta needs at least two distinct sizes, got {sorted(set(sizes))}"
        )
    if min(seconds) <= 0:
        raise ValueError(f"times must be positive, got {min(seconds)}")
    x, t = np.asarray(sizes, dtype=float), np.asarray(seconds, dtype=float)
    design = np.stack([np.ones_like(x), x], axis=1) / t[:, None]
    (alpha, beta), *_ = np.linalg.lstsq(design, np.ones_like(t), rcond=None)
    residuals = np.abs(alpha + beta * x - t) / t
    return Fit(float(alpha), float(beta), float(np.median(residuals)), float(residuals.max()), len(t))


def decode_cases() -> list[tuple[str, str, int]]:
    """(label, dtype, bytes) of the residual all-reduce of one decode step per model, batch and dtype."""
    cases = []
    for model, card_name in DECODE_MODELS.items():
        card = find_card(card_name)
        if card is None:
            raise LookupError(f"no model card named {card_name!r}")
        for batch in DECODE_BATCHES:
            for dtype in DECODE_DTYPES:
                size = batch * card.config.hidden_size * getattr(torch, dtype).itemsize
                cases.append((f"{model} decode b={batch}", dtype, size))
    return cases


def build_cases(sizes: Sequence[int], collectives: Sequence[Collective]) -> list[Case]:
    points = [("sweep", SWEEP_DTYPE, size) for size in sizes] + decode_cases()
    return [Case(c.value, label, dtype, size) for c in collectives for label, dtype, size in points]


def buffers(case: Case, ranks: int, fill: float) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's full tensor and its chunk (1/ranks of it), both filled with ``fill``."""
    dtype = getattr(torch, case.dtype)
    full = torch.full((case.elements(ranks),), fill, dtype=dtype)
    return full, full[: full.numel() // ranks].clone()


def collective_op(collective: Collective, full: torch.Tensor, chunk: torch.Tensor) -> Callable[[], object]:
    """all-reduce in place on ``full``; all-gather of the chunks into ``full``; reduce-scatter of the fulls
    into ``chunk``."""
    if collective is Collective.ALL_REDUCE:
        return lambda: dist.all_reduce(full)
    if collective is Collective.ALL_GATHER:
        return lambda: dist.all_gather_single(full, chunk)
    return lambda: dist.reduce_scatter_single(chunk, full)


def collective_call(case: Case, ranks: int) -> Callable[[], object]:
    """The collective on this rank's tensors, allocated once (the timing excludes allocation). Zeros: sums
    of zeros stay zeros however often they repeat (ones would overflow to inf after ~64 all-reduces)."""
    return collective_op(Collective(case.collective), *buffers(case, ranks, 0.0))


def check_collective(case: Case, ranks: int, rank: int) -> None:
    """One run on tensors filled with rank + 1 against what the collective must give, so that every time
    reported is of a collective that does its job."""
    collective = Collective(case.collective)
    full, chunk = buffers(case, ranks, rank + 1)
    collective_op(collective, full, chunk)()
    if collective is Collective.ALL_GATHER:
        got, expected = full, torch.arange(1, ranks + 1).repeat_interleave(chunk.numel()).to(full.dtype)
    else:
        got = full if collective is Collective.ALL_REDUCE else chunk
        expected = torch.full_like(got, ranks * (ranks + 1) // 2)  # small integers: exact in bfloat16
    if not torch.equal(got, expected):
        raise RuntimeError(f"rank {rank} of {ranks}: {case.collective} of {case.dtype} gave wrong values")


def join_group(rank: int, ranks: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    # One thread per rank: the ranks share two cores, and gloo's reductions are single-threaded anyway.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=ranks, timeout=GROUP_TIMEOUT)


def time_case(case: Case, ranks: int, repeats: int, warmup: int) -> list[float]:
    """Seconds per repeat, from the last rank's call to the last rank's return (every rank gets them)."""
    check_collective(case, ranks, dist.get_rank())
    call = collective_call(case, ranks)
    for _ in range(warmup):
        call()
    stamps = torch.empty(repeats, 2, dtype=torch.int64)
    for repeat in range(repeats):
        dist.barrier()
        stamps[repeat, 0] = time.perf_counter_ns()
        call()
        stamps[repeat, 1] = time.perf_counter_ns()
    everyone = torch.empty(ranks * repeats, 2, dtype=torch.int64)
    dist.all_gather_single(everyone, stamps)
    per_rank = everyone.view(ranks, repeats, 2)
    last_call, last_return = per_rank[:, :, 0].amax(dim=0), per_rank[:, :, 1].amax(dim=0)
    return ((last_return - last_call).double() / 1e9).tolist()


def _rank_main(
    rank: int, ranks: int, port: int, cases: list[Case], repeats: int, warmup: int, results: mp.Queue
) -> None:
    join_group(rank, ranks, port)
    try:
        timings = [time_case(case, ranks, repeats, warmup) for case in cases]
    finally:
        dist.destroy_process_group()
    if rank == 0:
        results.put(timings)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_group(ranks: int, cases: list[Case], repeats: int, warmup: int) -> list[list[float]]:
    """Every case on a fresh gloo group of ``ranks`` processes; per case, seconds per repeat."""
    context = mp.get_context("spawn")
    results: mp.Queue = context.Queue()
    port = free_port()
    workers = [
        context.Process(target=_rank_main, args=(rank, ranks, port, cases, repeats, warmup, results))
        for rank in range(ranks)
    ]
    for worker in workers:
        worker.start()
    try:
        timings = _wait_for_results(results, workers, ranks)
        for worker in workers:
            worker.join()
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
                worker.join()
    return timings


def _wait_for_results(results: mp.Queue, workers: Sequence[Any], ranks: int) -> list[list[float]]:
    """Rank 0's timings, or an error as soon as a rank has died (its peers would wait out the timeout)."""
    while True:
        try:
            return results.get(timeout=1)
        except queue.Empty:
            failed = [(rank, w.exitcode) for rank, w in enumerate(workers) if w.exitcode not in (None, 0)]
            if failed:
                raise RuntimeError(f"gloo group of {ranks} ranks: (rank, exit code) {failed}") from None
            if all(w.exitcode == 0 for w in workers):
                try:
                    return results.get(timeout=10)
                except queue.Empty:
                    raise RuntimeError(f"gloo group of {ranks} ranks exited without results") from None


@functools.cache
def tt_plan(collective: Collective, mesh_name: str) -> tuple[CollectivePlan, Mesh]:
    """Planned once per mesh: a Galaxy plan has thousands of transfers."""
    mesh = get_mesh(mesh_name)
    return plan_on_mesh(collective, mesh), mesh


def modelled_seconds(collective: Collective, total_bytes: float) -> dict[str, float]:
    """``collective_seconds(collective, total_bytes, mesh)`` on each TT mesh."""
    seconds = {}
    for name in TT_MESHES:
        plan, mesh = tt_plan(collective, name)
        seconds[name] = plan.seconds(total_bytes, mesh)
    return seconds


def measure(ranks_list: Sequence[int], cases: list[Case], repeats: int, warmup: int) -> list[dict[str, Any]]:
    rows = []
    for ranks in ranks_list:
        started = time.perf_counter()
        timings = run_group(ranks, cases, repeats, warmup)
        print(f"{ranks} ranks: {len(cases)} cases in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        for case, seconds in zip(cases, timings, strict=True):
            rows.append(
                {
                    **asdict(case),
                    "ranks": ranks,
                    "bytes": case.elements(ranks) * getattr(torch, case.dtype).itemsize,
                    "median_s": statistics.median(seconds),
                    "p90_s": float(np.percentile(seconds, 90)),
                    "min_s": min(seconds),
                    "seconds": seconds,
                    "modelled_s": modelled_seconds(Collective(case.collective), case.nominal_bytes),
                }
            )
    return rows


def fits(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The alpha-beta fit of gloo's float32 medians per rank count and collective, and of the modelled TT
    times at the same sizes (exact: the model is of that form), in one list."""
    out = []
    for collective in dict.fromkeys(r["collective"] for r in rows):
        mine = [r for r in rows if r["collective"] == collective and r["dtype"] == SWEEP_DTYPE]
        for ranks in dict.fromkeys(r["ranks"] for r in mine):
            points = [r for r in mine if r["ranks"] == ranks]
            fit = fit_alpha_beta([r["bytes"] for r in points], [r["median_s"] for r in points])
            out.append(fit_row(f"gloo, {ranks} ranks", collective, fit))
        sizes = sorted({r["nominal_bytes"] for r in mine})
        modelled = [modelled_seconds(Collective(collective), size) for size in sizes]
        for name in TT_MESHES:
            fit = fit_alpha_beta(sizes, [m[name] for m in modelled])
            out.append(fit_row(f"model, {name}", collective, fit))
    return out


def fit_row(source: str, collective: str, fit: Fit) -> dict[str, Any]:
    return {
        "source": source,
        "collective": collective,
        **asdict(fit),
        "bytes_per_s": fit.bytes_per_s,
        "crossover_bytes": fit.crossover_bytes,
    }


def human_bytes(size: float) -> str:
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size:.0f} B"


def microseconds(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f}" if seconds >= 1e-4 else f"{seconds * 1e6:.3g}"


def format_tables(rows: Sequence[dict[str, Any]], fitted: Sequence[dict[str, Any]]) -> str:
    ranks_list = list(dict.fromkeys(r["ranks"] for r in rows))
    header = ["collective", "size", "dtype", "what"]
    header += [f"gloo {n} ranks µs, median (p90)" for n in ranks_list]
    header += [f"model {name} µs" for name in TT_MESHES]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 4 + "---:|" * (len(header) - 4)]
    by_case: dict[tuple[str, str, str, int], dict[int, dict[str, Any]]] = {}
    for r in rows:
        by_case.setdefault((r["collective"], r["label"], r["dtype"], r["nominal_bytes"]), {})[r["ranks"]] = r
    for (collective, label, dtype, size), per_ranks in by_case.items():
        cells = [collective, human_bytes(size), dtype, label]
        cells += [
            f"{microseconds(per_ranks[n]['median_s'])} ({microseconds(per_ranks[n]['p90_s'])})"
            for n in ranks_list
        ]
        modelled = next(iter(per_ranks.values()))["modelled_s"]
        cells += [microseconds(modelled[name]) for name in TT_MESHES]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "| source | collective | alpha µs | 1/beta GB/s | crossover alpha/beta | fit error, median / max |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for f in fitted:
        lines.append(
            f"| {f['source']} | {f['collective']} | {f['alpha_s'] * 1e6:.3g} | {f['bytes_per_s'] / 1e9:.3g} "
            f"| {human_bytes(f['crossover_bytes'])} "
            f"| {f['median_relative_residual']:.0%} / {f['max_relative_residual']:.0%} |"
        )
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], fitted: Sequence[dict[str, Any]], path: Path) -> None:
    """Time against bytes, log-log, one panel per collective: gloo medians (p90 as the bar) per rank count
    with their fitted line, and the modelled TT topologies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    collectives = list(dict.fromkeys(r["collective"] for r in rows))
    fig, axes = plt.subplots(1, len(collectives), figsize=(5.6 * len(collectives), 4.8), squeeze=False)
    sizes = np.geomspace(min(r["nominal_bytes"] for r in rows), max(r["nominal_bytes"] for r in rows), 32)
    for ax, collective in zip(axes[0], collectives, strict=True):
        mine = [r for r in rows if r["collective"] == collective]
        for index, ranks in enumerate(dict.fromkeys(r["ranks"] for r in mine)):
            color = f"C{index}"
            for dtype, marker in ((SWEEP_DTYPE, "o"), ("bfloat16", "^")):
                points = sorted((r for r in mine if r["ranks"] == ranks and r["dtype"] == dtype),
                                key=lambda r: r["bytes"])  # fmt: skip
                if not points:
                    continue
                median = np.array([r["median_s"] for r in points])
                ax.errorbar(
                    [r["bytes"] for r in points],
                    median,
                    yerr=[np.zeros_like(median), np.array([r["p90_s"] for r in points]) - median],
                    fmt=marker,
                    color=color,
                    mfc=color if dtype == SWEEP_DTYPE else "none",
                    ms=4,
                    capsize=2,
                    label=f"gloo {ranks} ranks ({dtype})",
                )
            fit = next(
                f for f in fitted if f["source"] == f"gloo, {ranks} ranks" and f["collective"] == collective
            )
            ax.plot(sizes, fit["alpha_s"] + fit["beta_s_per_byte"] * sizes, ":", color=color, lw=1)
        modelled = [modelled_seconds(Collective(collective), size) for size in sizes]
        for index, name in enumerate(TT_MESHES):
            chips = get_mesh(name).num_chips
            ax.plot(
                sizes,
                [m[name] for m in modelled],
                "--",
                color=f"C{index + 4}",
                lw=1.2,
                label=f"model {name} ({chips} chips)",
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tensor bytes (full size)")
        ax.set_ylabel("seconds")
        ax.set_title(collective)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle(
        "gloo on loopback, this machine (markers: median, bar up to p90; dotted: its alpha-beta fit) "
        "vs ethernet_mesh's model of TT meshes (dashed)",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 3, 4], help="gloo group sizes")
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=DEFAULT_SIZES, help="swept tensor sizes in bytes (float32)"
    )
    parser.add_argument(
        "--collectives",
        nargs="+",
        default=[c.value for c in Collective],
        choices=[c.value for c in Collective],
    )
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per case")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs per case first")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--plot", type=Path, help="draw time against bytes here (PNG)")
    args = parser.parse_args(argv)
    if min(args.ranks) < 2:
        parser.error(f"a collective needs at least 2 ranks, got {min(args.ranks)}")
    if min(args.sizes) < 1:
        parser.error(f"sizes must be positive byte counts, got {min(args.sizes)}")
    if args.repeats < 1 or args.warmup < 0:
        parser.error(f"need --repeats >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")
    if "CLOCK_MONOTONIC" not in time.get_clock_info("perf_counter").implementation:
        parser.error(
            "the ranks' timestamps are compared: perf_counter must be the system-wide CLOCK_MONOTONIC"
        )

    cases = build_cases(args.sizes, [Collective(c) for c in args.collectives])
    load_before = os.getloadavg()
    rows = measure(args.ranks, cases, args.repeats, args.warmup)
    fitted = fits(rows)
    print(
        f"gloo on loopback, {os.cpu_count()} CPUs, load average {load_before[0]:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at end; {args.repeats} repeats after {args.warmup} warm-up runs"
    )
    print(format_tables(rows, fitted))
    results = {
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "load_average_start": load_before,
        "load_average_end": os.getloadavg(),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "threads_per_rank": 1,
        "measurements": rows,
        "fits": fitted,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    if args.plot:
        plot(rows, fitted, args.plot)
    return results


def _partner_main(port: int, case: Case) -> None:
    """Rank 1 of the pytest-benchmark test: runs the collective each time rank 0 broadcasts 1, stops at 0."""
    join_group(1, 2, port)
    call, command = collective_call(case, 2), torch.zeros(1, dtype=torch.int64)
    try:
        while True:
            dist.broadcast(command, src=0)
            if not command.item():
                break
            call()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("batch", DECODE_BATCHES, ids=lambda b: f"batch{b}")
def test_decode_all_reduce_two_ranks(benchmark: Any, batch: int) -> None:
    """pytest-benchmark entry point: Llama-3.1-8B's decode residual all-reduce (bfloat16) over 2 gloo ranks,
    this process being rank 0. Each round's untimed setup tells rank 1 to join the next all-reduce."""
    card = find_card(DECODE_MODELS["Llama-3.1-8B"])
    assert card is not None
    case = Case(Collective.ALL_REDUCE.value, "decode", "bfloat16", batch * card.config.hidden_size * 2)
    port, threads = free_port(), torch.get_num_threads()
    partner = mp.get_context("spawn").Process(target=_partner_main, args=(port, case))
    partner.start()
    join_group(0, 2, port)
    go, stop = torch.ones(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
    try:
        call = collective_call(case, 2)
        benchmark.pedantic(call, setup=lambda: dist.broadcast(go, src=0), rounds=200, warmup_rounds=10)
        dist.broadcast(stop, src=0)
    finally:
        dist.destroy_process_group()
        torch.set_num_threads(threads)
        partner.join(timeout=30)
    assert partner.exitcode == 0


if __name__ == "__main__":
    main(sys.argv[1:])
