"""Command line: `workbench demo` (routing report of the embedded model), `workbench trace` (stream activations
to a store), `workbench info`."""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .demo import EMBEDDED_MODEL as DEFAULT_MODEL


def demo(args: argparse.Namespace) -> int:
    """Trace the embedded model's routing over every corpus domain; summary here, report in HTML."""
    from .demo import run

    run(Path(args.model), Path(args.out), args.max_bytes)
    return 0


def user_errors(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Report a user error (bad argument, file, checkpoint or store) as one line and exit code 2."""
    from workbench.errors import HookError

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except (ValueError, HookError, OSError) as e:
            message = " ".join(str(e).split()) or type(e).__name__
            print(f"workbench {args.command}: error: {message}", file=sys.stderr)
            return 2
    return run


TEXT_BLOCK = 1 << 20  # bytes read at a time from a --text file


def text_tokens(tokenizer, path: Path) -> np.ndarray:
    """Token ids of a UTF-8 text file read in blocks: byte-exact for the byte tokenizer; other tokenizers
    encode blocks of whole lines (they differ from one whole-file call only if a token would span a line end),
    and the special tokens the checkpoint adds (BOS, EOS) frame the whole text once, not every block."""
    from workbench.tokenizer import ByteTokenizer

    parts = []
    if isinstance(tokenizer, ByteTokenizer):
        with open(path, "rb") as f:
            while block := f.read(TEXT_BLOCK):
                parts.append(np.frombuffer(block, np.uint8).astype(np.int64) + tokenizer.offset)
    else:
        head: list[int] = []
        tail: list[int] = []
        with open(path, encoding="utf-8") as f:
            while lines := f.readlines(TEXT_BLOCK):
                text = "".join(lines)
                ids = tokenizer.encode(text, add_special_tokens=False)
                if not parts:  # what the checkpoint adds around a text: before and after its plain ids
                    framed = tokenizer.encode(text)
                    at = next(i for i in range(len(framed) - len(ids) + 1) if framed[i:i + len(ids)] == ids)
                    head, tail = framed[:at], framed[at + len(ids):]
                parts.append(np.asarray(ids, dtype=np.int64))
        parts = [np.asarray(head, dtype=np.int64), *parts, np.asarray(tail, dtype=np.int64)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _tokens(args: argparse.Namespace, model) -> tuple[np.ndarray, int | None]:
    """The token ids to trace and the seed that made them (random tokens only)."""
    if args.seed is not None and args.random_tokens is None and not args.do_sample:
        raise ValueError("--seed applies only to --random-tokens and --do-sample")
    if args.text is not None:
        if model.tokenizer is None:
            raise ValueError(f"{args.model}: the model has no tokenizer; pass --tokens FILE.npy instead")
        return text_tokens(model.tokenizer, Path(args.text)), None
    if args.tokens is not None:
        return np.load(args.tokens, mmap_mode="r", allow_pickle=False), None
    seed = 0 if args.seed is None else args.seed
    if args.random_tokens < 1:
        raise ValueError(f"--random-tokens must be at least 1, got {args.random_tokens}")
    return np.random.default_rng(seed).integers(0, model.vocab_size, args.random_tokens), seed


def _generation(args: argparse.Namespace) -> dict:
    """`trace`'s generation arguments from --generate and the sampling flags (which need it)."""
    if args.generate is None:
        if args.do_sample or args.temperature != 1.0 or args.top_p != 1.0 or args.stop:
            raise ValueError("--do-sample, --temperature, --top-p and --stop apply only with --generate N")
        return {}
    return dict(generate=args.generate, do_sample=args.do_sample, temperature=args.temperature, top_p=args.top_p,
                stop=args.stop)


def _window(text: str) -> tuple[int, int]:
    """START:END of a --window argument."""
    start, _, end = text.partition(":")
    try:
        return int(start), int(end)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:END token positions, got {text!r}") from None


def _bytes(n: float) -> str:
    units = ("B", "kB", "MB", "GB", "TB")
    i = 0
    while n >= 1000 and i < len(units) - 1:
        n, i = n / 1000, i + 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"


def _saes(specs: list[str], device: torch.device) -> dict:
    """{hook: SAE} of --sae's [HOOK=]SOURCE arguments: each SAE at the hook it names (its cfg's `hook_name`)
    unless HOOK is given, at most one per hook."""
    from workbench.sae import load_sae

    saes: dict = {}
    for spec in specs:
        hook, sep, source = spec.partition("=")
        if not sep or "/" in hook or "\\" in hook:  # a path or repo id holding "=" is all source
            hook, source = "", spec
        sae = load_sae(source, device=device)
        hook = hook or sae.hook_name
        if not hook:
            raise ValueError(f"--sae {spec}: its cfg.json names no hook_name; give it as HOOK={source}")
        if hook in saes:
            raise ValueError(f"--sae: two SAEs at {hook!r}")
        saes[hook] = sae
    return saes


@user_errors
def trace(args: argparse.Namespace) -> int:
    """Stream routing (and hooks named by --names) of a token sequence to a zarr store; rerun to resume.
    Under torchrun (WORLD_SIZE > 1) the ranks run it expert-parallel and rank 0 writes the store."""
    import workbench as wb
    from workbench import distributed
    from workbench.store import open_store, trace as run_trace

    rank, world = distributed.init()
    finished = False
    try:
        dtype = None if args.dtype is None else getattr(torch, args.dtype)
        device = f"cuda:{torch.cuda.current_device()}" if world > 1 and torch.cuda.is_available() else None
        model = wb.load(args.model, backend=args.backend, dtype=dtype, device=device,
                        tensor_parallel=args.tensor_parallel, dequantize=args.dequantize)
        tokens, seed = _tokens(args, model)
        saes = _saes(args.sae or [], model.embed.weight.device)
        try:
            out = run_trace(model, tokens, args.out, names=args.names, chunk_tokens=args.chunk_tokens,
                            layers=args.layers, windows=args.window, overwrite=args.overwrite,
                            seed=args.seed if seed is None else seed, saes=saes, sae_k=args.sae_k,
                            **_generation(args))
        except KeyboardInterrupt:
            print(f"workbench trace: interrupted; rerun the same command to resume {args.out}", file=sys.stderr)
            return 130
        finished = True
    finally:
        distributed.shutdown(wait=finished)  # a rank that failed alone must not wait for the others
    if rank != 0:
        return 0
    s = open_store(out).attrs["summary"]
    how = {"snapshot": " from its state snapshot", "replay": " by replaying the committed tokens"}
    resumed = f", resumed at token {s['resumed_at']:,}{how.get(s.get('resumed_from'), '')}" if s["resumed_at"] else ""
    if s.get("resumed_from") == "replay" and not model.bounded_state:
        resumed += " (full attention: its state is not snapshot)"
    print(f"traced {s['traced_tokens']:,} tokens into {out}{resumed} in {s['wall_s']:.2f} s "
          f"({s['tokens_per_s']:,.0f} tokens/s)")
    per_entry = s["bytes_per_routing_entry"]
    routing = f", {per_entry:.2f} bytes per routing entry (token, layer, k)" if per_entry is not None else ""
    print(f"{s['tokens']:,} tokens, {s['layers']} layers ({s['routed_layers']} routed, k={s['k']}); "
          f"{_bytes(s['bytes_on_disk'])} on disk{routing}; peak RSS {_bytes(s['peak_rss_bytes'])}")
    return 0


@user_errors
def info(args: argparse.Namespace) -> int:
    """Print a store's dims, variables, sizes, progress and provenance; with --check, the damaged chunks
    (exit code 1 if any)."""
    from workbench.schema import ROUTING_VARIABLES
    from workbench.store import check, disk_bytes, open_store

    path = Path(args.store)
    ds = open_store(path)
    a = ds.attrs
    status = "complete" if a["complete"] else "incomplete: rerun `workbench trace` with the same arguments to resume"
    print(f"store      {path} ({_bytes(disk_bytes(path))} on disk)")
    print(f"tokens     {a['committed_tokens']:,} of {a['tokens_total']:,} committed ({status})")
    first = ("layer", "token", "k")  # a fixed order: xarray's follows the variables' order, which may vary
    dims = sorted(ds.sizes, key=lambda d: (first.index(d) if d in first else len(first), d))
    print("dims       " + ", ".join(f"{d} {ds.sizes[d]:,}" for d in dims))
    if "layer" in ds.coords:
        print("layer      " + " ".join(str(int(i)) for i in ds.layer.values))
    print("variables")
    names = sorted(ds.data_vars, key=lambda n: (n not in ROUTING_VARIABLES, n))
    width = max(map(len, names), default=0)
    for name in names:
        var = ds[name]
        dims = "(" + ", ".join(var.dims) + ")"
        print(f"  {name:<{width}}  {dims:<32} {str(var.dtype):<8} chunks {tuple(var.encoding['chunks'])!s:<20} "
              f"{_bytes(disk_bytes(path / name)):>9}")
    print("provenance")
    for key in ("source", "revision", "commit", "model_type", "dtype", "device", "config_sha256"):
        print(f"  {key:<18} {a[key]}")
    print(f"  {'backend':<18} {a.get('backend', 'torch')}, {a.get('world_size', 1)} rank(s)")
    for file, sha in a["weights_sha256"].items():
        print(f"  {'weights_sha256':<18} {file} {sha}")
    print(f"  {'versions':<18} workbench {a['workbench_version']}, "
          + ", ".join(f"{k} {v}" for k, v in a["versions"].items()))
    for key in ("seed", "tokens_sha256", "names", "layers", "windows", "chunk_tokens", "created", "completed"):
        print(f"  {key:<18} {a.get(key)}")
    if a.get("generation"):
        print(f"  {'generation':<18} {a['generation']}")
    for hook, sae in (a.get("saes") or {}).items():
        cfg = sae["cfg"]
        print(f"  {'sae':<18} {hook}: {cfg.get('architecture', 'standard')}, d_in {cfg['d_in']}, d_sae {cfg['d_sae']}; "
              f"{sae['k']} latents stored per token; weights sha256 {sae['weights_sha256']}")
    if not args.check:
        return 0
    damage = check(path)
    if not damage:
        print(f"check      every chunk of the {a['committed_tokens']:,} committed tokens reads whole")
        return 0
    print(f"check      {len(damage)} damaged chunk(s): restore the store from a copy, or trace it again with "
          "--overwrite")
    for d in damage:
        print(f"  {d}")
    return 1


@user_errors
def plan(args: argparse.Namespace) -> int:
    """Memory per rank and disk reads per rank under expert (and tensor) parallelism, from the model's config alone."""
    from workbench.plan import GiB, census, fit_report, report

    if args.world_size is None and args.gpu_memory is None:
        raise ValueError("give --world-size N, or --gpu-memory GiB to find the smallest world size that fits")
    if args.gpu_memory is not None and not args.gpu_memory > 0:
        raise ValueError(f"--gpu-memory must be a positive number of GiB, got {args.gpu_memory}")
    c = census(args.model, dtype=args.dtype, tensor_parallel=args.tensor_parallel, dequantize=args.dequantize)
    budget = None if args.gpu_memory is None else int(args.gpu_memory * GiB)
    world_size = args.world_size
    if world_size is None:
        world_size = c.smallest_world_size(budget, args.context) or c.world_sizes[-1]
    print(report(c.at(world_size, args.context)))
    if budget is not None:
        print(fit_report(c, budget, args.context))
    return 0


@user_errors
def hash_folder(args: argparse.Namespace) -> int:
    """Write SHA256SUMS for a local checkpoint folder, so that every later `load` of it checks its files."""
    from workbench.checkpoint import MANIFEST, write_manifest

    digests = write_manifest(Path(args.folder), overwrite=args.overwrite, progress=True)
    print(f"{Path(args.folder) / MANIFEST} records the sha256 of {len(digests)} files")
    return 0


def _parameters(pairs: list[list[str]] | None) -> dict:
    from workbench.publish import parse_value

    return {name: parse_value(value) for name, value in pairs or []}


@user_errors
def publish(args: argparse.Namespace) -> int:
    """Execute a notebook in a fresh kernel; write it executed, as offline HTML, and with its manifest."""
    import json

    from workbench.publish import NotebookError, publish as run_publish

    try:
        out = run_publish(args.notebook, args.out, _parameters(args.parameter), timeout=args.timeout,
                          kernel=args.kernel)
    except NotebookError as e:
        print(f"workbench publish: error: {e}\nnothing was written to {args.out}", file=sys.stderr)
        return 1
    manifest = json.loads((out / "manifest.json").read_text())
    print(f"published {args.notebook} to {out}: {', '.join(sorted(manifest['files']))}, manifest.json "
          f"({len(manifest['models'])} model(s), {len(manifest['inputs'])} input file(s), "
          f"{len(manifest['traces'])} routing trace(s); executed in {manifest['execution']['wall_s']:.1f} s)")
    return 0


@user_errors
def verify(args: argparse.Namespace) -> int:
    """Re-execute a published notebook and compare what it loads, reads and traces with its manifest."""
    import warnings

    from workbench.publish import ReproducibilityWarning, read_manifest, verify as run_verify

    manifest = read_manifest(args.dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ReproducibilityWarning)
        differences = run_verify(args.dir, timeout=args.timeout, parameters=_parameters(args.parameter))
    for w in caught:
        if issubclass(w.category, ReproducibilityWarning):
            print(f"warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if differences:
        print(f"NOT verified: {args.dir}: {len(differences)} difference(s)")
        for line in differences:
            print(f"  {line}")
        return 1
    print(f"verified: {args.dir}: {manifest['notebook']['name']} re-executed with the same notebook, parameters and "
          f"seeds; {len(manifest['models'])} model(s), {len(manifest['inputs'])} input file(s) and "
          f"{len(manifest['traces'])} routing trace(s) identical")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="workbench", description="MoE research and interpretability workbench")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="trace the embedded model's routing by domain; write an HTML report")
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="checkpoint folder")
    p.add_argument("--out", default="workbench-demo.html", help="report file to write")
    p.add_argument("--max-bytes", type=int, default=12288, help="held-out bytes per domain to trace")
    p.set_defaults(func=user_errors(demo))
    p = sub.add_parser("trace", help="stream routing and named activations of a long sequence to a zarr store",
                       description="Rerunning on an incomplete store resumes it; a complete one is refused "
                                   "unless --overwrite.")
    p.add_argument("model", help="checkpoint folder or hub repo id")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", metavar="FILE", help="UTF-8 text file, tokenised with the model's tokenizer")
    src.add_argument("--tokens", metavar="FILE.npy", help="1-D integer array of token ids")
    src.add_argument("--random-tokens", metavar="N", type=int, help="N uniformly random token ids")
    p.add_argument("--seed", type=int, help="seed of --random-tokens (default 0) and of --do-sample")
    p.add_argument("--out", required=True, metavar="STORE", help="zarr store directory to write")
    p.add_argument("--names", nargs="+", action="extend", metavar="GLOB",
                   help="hook points to record besides routing, e.g. 'layers.*.resid_post'")
    p.add_argument("--layers", nargs="+", type=int, metavar="L", help="record --names only at these layers")
    p.add_argument("--window", action="append", type=_window, metavar="START:END",
                   help="record --names only for tokens [START, END); repeatable")
    p.add_argument("--sae", action="append", metavar="[HOOK=]SAE",
                   help="also store this SAE's largest latents per token at its hook (within --window): an SAELens "
                        "folder, a shipped name or a hub repo; HOOK overrides its cfg's hook_name; repeatable")
    p.add_argument("--sae-k", type=int, default=32, metavar="K", help="latents stored per token and SAE (default 32)")
    p.add_argument("--chunk-tokens", type=int, default=8192, metavar="N", help="tokens per forward chunk and commit")
    p.add_argument("--generate", type=int, metavar="N",
                   help="continue the tokens by up to N generated tokens, traced too")
    p.add_argument("--do-sample", action="store_true", help="sample the generated tokens (default: greedy)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1)")
    p.add_argument("--stop", nargs="+", type=int, metavar="ID", help="token ids that end the generation")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: the checkpoint's; float32 is the fastest on CPUs without bf16 units)")
    p.add_argument("--backend", default="auto", help="model backend (see workbench.load)")
    p.add_argument("--overwrite", action="store_true", help="replace a complete or different store at --out")
    p.add_argument("--dequantize", action="store_true",
                   help="dequantise FP8/FP4 weights on load to --dtype (default: kept as stored, dequantised as they "
                        "run)")
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="T",
                   help="under torchrun, also split attention heads over groups of T ranks, e.g. the GPUs of one "
                        "node (DeepSeek-V4)")
    p.set_defaults(func=trace)
    p = sub.add_parser("info", help="describe a store: dims, variables, sizes, progress, provenance")
    p.add_argument("store", help="zarr store directory written by `workbench trace`")
    p.add_argument("--check", action="store_true",
                   help="also read every chunk of every variable (checksums verified) and list the damaged ones "
                        "with their token ranges; exit code 1 if any is damaged")
    p.set_defaults(func=info)
    p = sub.add_parser("plan", help="memory and disk reads per rank under expert parallelism, from the config alone",
                       description="Rank r of N holds routed experts [r*E//N, (r+1)*E//N) of every MoE layer; "
                                   "everything else is replicated (with --tensor-parallel T, attention heads are "
                                   "split over groups of T consecutive ranks). Memory counts parameters as loaded "
                                   "(quantised weights kept as stored, unless --dequantize); disk counts the bytes "
                                   "each rank reads from the checkpoint as its quantization_config stores it.")
    p.add_argument("model", help="checkpoint folder, config.json file, or hub repo id (only config.json is fetched)")
    p.add_argument("--world-size", type=int, metavar="N", help="ranks (default with --gpu-memory: the fewest that fit)")
    p.add_argument("--dtype", help="dtype of the loaded parameters: bf16, fp16 or fp32 (default: the config's)")
    p.add_argument("--dequantize", action="store_true",
                   help="count quantised weights dequantised to --dtype, as `trace --dequantize` holds them")
    p.add_argument("--context", type=int, metavar="TOKENS", help="add one sequence's attention state for TOKENS tokens")
    p.add_argument("--gpu-memory", type=float, metavar="GiB",
                   help="memory per rank: report the smallest world size whose per-rank total fits")
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="T",
                   help="also split attention heads over groups of T consecutive ranks, as `trace --tensor-parallel "
                        "T` does (DeepSeek-V4; T must divide N, num_attention_heads and o_groups; with --gpu-memory, "
                        "world sizes that are multiples of T are searched)")
    p.set_defaults(func=plan)
    p = sub.add_parser("hash", help="write SHA256SUMS for a local checkpoint folder, which `load` then verifies",
                       description="Hashes every *.safetensors file and the config, shard index and tokenizer "
                                   "that `load` reads (in parallel, remembered in the hash cache) and writes "
                                   "FOLDER/SHA256SUMS in `sha256sum` format, sorted, atomically. A SHA256SUMS "
                                   "recording the same hashes is left as it is; a different one is refused "
                                   "unless --overwrite.")
    p.add_argument("folder", help="local checkpoint folder")
    p.add_argument("--overwrite", action="store_true", help="replace a SHA256SUMS that records other hashes")
    p.set_defaults(func=hash_folder)
    p = sub.add_parser("publish", help="execute a notebook; write it executed, as offline HTML, with a provenance "
                                       "manifest",
                       description="Executes NOTEBOOK in a fresh kernel (papermill; cwd: its folder) and writes "
                                   "DIR/NAME.ipynb (executed), DIR/NAME.html (no kernel or network needed; plotly.js "
                                   "inline; widgets show their static fallback), DIR/source/NAME.ipynb and "
                                   "DIR/manifest.json: versions, hardware, parameters, seeds, the hashes of every "
                                   "model file, input file and routing trace. A failing cell writes nothing.")
    p.add_argument("notebook", help="notebook to execute (.ipynb)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write (a previous publication is replaced)")
    p.add_argument("-p", "--parameter", nargs=2, action="append", metavar=("NAME", "VALUE"),
                   help="set a parameter of the cell tagged `parameters` (True/False/None, numbers parsed); repeatable")
    p.add_argument("--timeout", type=float, default=3600, metavar="S", help="seconds per cell (0: no limit)")
    p.add_argument("--kernel", metavar="NAME", help="kernel to run (default: the notebook's kernelspec)")
    p.set_defaults(func=publish)
    p = sub.add_parser("verify", help="re-execute a published notebook and compare with its manifest",
                       description="Re-executes DIR/source/NAME.ipynb in the notebook's original folder with the "
                                   "recorded parameters and compares the notebook, parameters, seeds, model, config, "
                                   "tokenizer and input file hashes, routing trace hashes and the workbench version; "
                                   "package versions and hardware are reported as warnings. Exit 0: verified; 1: "
                                   "differences, one per line. Routing traces are bit-reproducible for a given "
                                   "backend, dtype, machine and thread count: `torch` and `grouped` on CPU in "
                                   "float32 repeat exactly with the same torch thread count; another CPU, BLAS or "
                                   "thread count can change the low bits of routing weights (verify then says "
                                   "whether the top-k ids still agree).")
    p.add_argument("dir", metavar="DIR", help="folder written by `workbench publish`")
    p.add_argument("--timeout", type=float, default=3600, metavar="S", help="seconds per cell (0: no limit)")
    p.add_argument("-p", "--parameter", nargs=2, action="append", metavar=("NAME", "VALUE"),
                   help="re-execute with this parameter changed (reported as a difference); repeatable")
    p.set_defaults(func=verify)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
