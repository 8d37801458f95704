"""The command line, `python -m gptj_helpers COMMAND`: one subcommand per task of the series (the notebook runner
behind `make demo` and `make notebooks` among them), and torchrun's entry point for pipeline stages and ranks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .models import DTYPES, GPTJ_6B_REPO, GPTJ_6B_REVISION, as_dtype, default_dtype
from .tiny import TINY_SEED
from .files import build_atomically
from .hardware import describe_hardware
from .devices import list_devices, parse_devices
from .hub import download_gptj, load_config, load_tokenizer, resolve_model, weights_dir
from .convert import convert_jax_checkpoint
from .random_models import make_tiny_gptj
from .convert_bin import convert_to_safetensors
from .plan import QUANTIZED_FORMATS, format_plan, plan_split
from .setups import setups_markdown
from .place import place_stages
from .sampling import SAMPLING_DEFAULTS, check_prompts
from .generate import format_timing, generate_text
from .plots import save_notebook_figure
from .runner import run_notebooks
from .cli_ranks import cmd_pipeline, cmd_tensor_parallel, sampling_of
from .slots import plan_slots
from .server import serve_model
from .ranks import DEFAULT_TIMEOUT


def cmd_make_tiny(args: argparse.Namespace) -> None:
    """make-tiny OUT_DIR: write the tiny default model."""
    out = Path(args.out_dir)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"make-tiny: {out} exists and is not empty; choose a new folder")
    build_atomically(out, lambda tmp: make_tiny_gptj(tmp, seed=args.seed, format=args.format))
    print(out)


def cmd_download(args: argparse.Namespace) -> None:
    """download [REPO] --revision R --local-dir DIR: fetch config, tokenizer and one copy of the weights (.bin files
    converted to safetensors beside them; --delete-bin: then deleted)."""
    print(download_gptj(args.repo_id, revision=args.revision, local_dir=args.local_dir or weights_dir(),
                        endpoint=args.endpoint,
                        delete_bin=args.delete_bin))


def cmd_convert_jax(args: argparse.Namespace) -> None:
    """convert-jax SLIM_DIR OUT_DIR: the original JAX slim checkpoint to safetensors."""
    print(convert_jax_checkpoint(args.slim_dir, args.out_dir, config=args.config, dtype=DTYPES[args.dtype],
                                 progress=not args.no_progress))


def cmd_convert_bin(args: argparse.Namespace) -> None:
    """convert-bin SRC OUT_DIR: a pytorch_model.bin, or a folder of one or sharded .bin files, to safetensors."""
    print(convert_to_safetensors(args.src, args.out_dir, dtype=DTYPES.get(args.dtype), progress=not args.no_progress))


def cmd_devices(args: argparse.Namespace) -> None:
    """devices [SPEC]: list this machine's devices, or parse a device spec."""
    for d in parse_devices(args.spec) if args.spec else list_devices():
        print(d)


def cmd_run_notebooks(args: argparse.Namespace) -> None:
    """run-notebooks NB...: execute notebooks headless, copies under --out (or --inplace)."""
    if not args.inplace and not args.out:
        raise ValueError("run-notebooks needs --out DIR or --inplace")
    times = run_notebooks(args.notebooks, out_dir=args.out, inplace=args.inplace, force=args.force)
    print(f"all {len(times)} notebooks: {sum(t for _, t in times):.1f} s")
    if args.out:
        print(f"executed notebooks are in {Path(args.out).resolve()}/, figures in {Path(args.out).resolve()}/figures/")


def cmd_notebook_figure(args: argparse.Namespace) -> None:
    """notebook-figure NB NAME OUT: save the figure a notebook showed, as executed."""
    print(save_notebook_figure(args.notebook, args.name, args.out))


def cmd_plan(args: argparse.Namespace) -> None:
    """plan: print how the model splits over the devices, as a table or as the Plan's JSON."""
    devices = parse_devices(args.devices, describe_hardware(args.hardware) if args.hardware else None)
    plan = plan_split(args.model, devices, dtype=args.dtype, reserve=args.reserve,
                      prompt_tokens=args.prompt_tokens, max_new_tokens=args.max_new_tokens,
                      batch_size=args.batch_size, model_name=args.model, weights=args.weights)
    print(plan.to_json() if args.json else format_plan(plan))


def cmd_generate(args: argparse.Namespace) -> None:
    """generate: continue prompts through the model split over --devices; text on stdout, timings on stderr."""
    path = resolve_model(args.model, delete_bin=args.delete_bin)  # downloads, or converts .bin files, once
    tokenizer = load_tokenizer(str(path))
    config = load_config(args.model)
    sampling = sampling_of(args)
    ids = check_prompts(config, tokenizer, args.prompt, args.max_new_tokens)  # before any loading
    devices = parse_devices(args.devices)
    dtype = as_dtype(args.dtype) or default_dtype(config, devices)
    batch = 1 if args.stream else len(ids)
    plan = plan_split(config, devices, dtype=dtype, prompt_tokens=max(map(len, ids)),
                      max_new_tokens=args.max_new_tokens, batch_size=batch, model_name=args.model)
    print(format_plan(plan), file=sys.stderr)
    model = place_stages(path, plan)
    groups = [[p] for p in args.prompt] if args.stream else [args.prompt]  # streaming shows one prompt at a time
    first = True
    for prompts in groups:
        texts, record = generate_text(model, tokenizer, prompts, args.max_new_tokens, sampling=sampling,
                                      stream=args.stream)
        for prompt, text in zip(prompts, texts):
            if not first and not args.stream:
                print()
            if not args.stream:
                print(prompt + text, flush=True)
            first = False
        if args.stream and prompts is not groups[-1]:
            print(flush=True)
        print(format_timing(record), file=sys.stderr)


def cmd_serve(args: argparse.Namespace) -> None:
    """serve: an OpenAI-compatible server (FastAPI on uvicorn) of the model split over --devices, with continuous
    batching over a KV cache of slots; until Ctrl-C or SIGTERM (notebook 10)."""
    path = resolve_model(args.model, delete_bin=args.delete_bin)  # downloads, or converts .bin files, once
    tokenizer = load_tokenizer(str(path))
    config = load_config(args.model)
    devices = parse_devices(args.devices)
    dtype = as_dtype(args.dtype) or default_dtype(config, devices)
    slot_plan = plan_slots(config, devices, args.max_len, dtype, args.slots, model_name=args.model)
    print(f"{slot_plan}\n{format_plan(slot_plan.plan)}", file=sys.stderr)
    model = place_stages(path, slot_plan.plan)
    name = args.model if args.model in ("tiny", GPTJ_6B_REPO, "gpt-j-6b") else Path(args.model).name
    print(f"serving {name} at http://{args.host}:{args.port}/v1 (Ctrl-C stops it)", file=sys.stderr, flush=True)
    serve_model(model, tokenizer, name, slot_plan.slots, args.max_len, args.host, args.port, args.api_key)


def cmd_setups(args: argparse.Namespace) -> None:
    """setups: print the README's table of common setups."""
    print(setups_markdown())


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """The options generate and pipeline share: as generate_text's keywords."""
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--greedy", action="store_true", help="always take the most likely token (no sampling)")
    p.add_argument("--temperature", type=float, default=SAMPLING_DEFAULTS["temperature"])
    p.add_argument("--top-p", type=float, default=SAMPLING_DEFAULTS["top_p"])
    p.add_argument("--top-k", type=int, default=SAMPLING_DEFAULTS["top_k"], help="0: no top-k filter (the seed's)")
    p.add_argument("--seed", type=int, help="seed the sampler for a reproducible text")


def add_dry_run_arguments(p: argparse.ArgumentParser) -> None:
    """--dry-run and what it plans for: pipeline and tensor-parallel share them."""
    p.add_argument("--dry-run", action="store_true", help="print where each rank would run and what it would hold, "
                   "one line a rank (under torchrun: this rank's); nothing loads, no group forms")
    p.add_argument("--json", action="store_true", help="with --dry-run: the same as JSON")
    p.add_argument("--prompt-tokens", type=int, default=0, help="with --dry-run: prompt length the KV cache is "
                   "planned for")


DELETE_BIN_HELP = ("when the weights are pytorch_model*.bin: delete them once their safetensors copy is checked "
                   "(frees about half the disk, e.g. 12 GB of GPT-J-6B's float16 branch)")


def build_parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per task of the series."""
    parser = argparse.ArgumentParser(prog="python -m gptj_helpers", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("make-tiny", help="write the tiny default GPT-J (random weights) and its tokenizer")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=TINY_SEED)
    p.add_argument("--format", choices=["hf", "jax-slim"], default="hf",
                   help="hf: safetensors + tokenizer (default); jax-slim: the original JAX checkpoint layout")
    p.set_defaults(func=cmd_make_tiny)

    p = sub.add_parser("download", help="download GPT-J (or another hub model) with huggingface_hub")
    p.add_argument("repo_id", nargs="?", default=GPTJ_6B_REPO)
    p.add_argument("--revision", default=GPTJ_6B_REVISION, help="branch or commit (default: float16)")
    p.add_argument("--local-dir", help="put the files here instead of the hub cache (default: $GPTJ_WEIGHTS if set)")
    p.add_argument("--endpoint", help="hub URL (default: huggingface.co or $HF_ENDPOINT)")
    p.add_argument("--delete-bin", action="store_true", help=DELETE_BIN_HELP)
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("convert-jax", help="convert the original JAX slim checkpoint to safetensors, streamed")
    p.add_argument("slim_dir", help="the folder holding shard_0 ... shard_7")
    p.add_argument("out_dir")
    p.add_argument("--config", help="mesh-transformer-jax config JSON (default: GPT-J-6B's)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float16")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_convert_jax)

    p = sub.add_parser("convert-bin", help="convert a pytorch_model.bin to safetensors without running pickle code")
    p.add_argument("src", help="pytorch_model.bin, or the folder holding it or its shards (config and tokenizer are "
                   "copied)")
    p.add_argument("out_dir")
    p.add_argument("--dtype", choices=list(DTYPES), help="default: keep the saved dtype")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_convert_bin)

    p = sub.add_parser("devices", help="list this machine's devices, or parse a device spec like 3x5GiB")
    p.add_argument("spec", nargs="?")
    p.set_defaults(func=cmd_devices)

    p = sub.add_parser("plan", help="plan the split of a model over devices with memory budgets")
    p.add_argument("--model", default="tiny", help="tiny, gpt-j-6b, or a model folder")
    p.add_argument("--devices", required=True, help='e.g. "3x5GiB" or "cuda:0=6GiB,cuda:1=10GiB"')
    p.add_argument("--dtype", choices=list(DTYPES), help="default: float16 on GPUs, bfloat16 on the CPU for GPT-J-6B; "
                   "else the saved dtype (float32 for tiny)")
    p.add_argument("--weights", choices=[*DTYPES, *QUANTIZED_FORMATS], help="the blocks' linear weights: int8 or "
                   "nf4 (notebook 08); default: unquantized, in the compute dtype")
    p.add_argument("--prompt-tokens", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--reserve", default="0", help="bytes kept free on every device, e.g. 1GiB")
    p.add_argument("--json", action="store_true", help="print the Plan object as JSON")
    p.add_argument("--hardware", help='plan for a machine that is not this one, e.g. "2 x T4" or "4 x 8GB" (cards: '
                   'T4, P100, 4GB, 8GB, 10GB, A100, H100); default: this machine, read from torch')
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("setups", help="plan GPT-J-6B for common setups (the README's table)")
    p.set_defaults(func=cmd_setups)
    p = sub.add_parser("pipeline", help="generate with one process per stage (torchrun or started from here)")
    p.add_argument("--model", default="tiny", help="tiny, gpt-j-6b, or a model folder")
    p.add_argument("--devices", required=True, help='one stage per device, e.g. "cpu,cpu" or "cuda:0,cuda:1"')
    p.add_argument("--prompts-file", help="a text file with one prompt per line")
    p.add_argument("--micro-batches", type=int, default=1)
    add_sampling_arguments(p)
    p.add_argument("--dtype", choices=list(DTYPES), help="default: float16 on GPUs, bfloat16 on the CPU for GPT-J-6B; "
                   "else the saved dtype (float32 for tiny)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds a stage waits for a neighbour")
    add_dry_run_arguments(p)
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("tensor-parallel", help="generate, every block cut over one process per device (notebook 07)")
    p.add_argument("--model", default="tiny", help="tiny, gpt-j-6b, or a model folder")
    p.add_argument("--devices", required=True, help='one rank per device, e.g. "cpu,cpu" or "cuda:0,cuda:1"')
    p.add_argument("--prompt", action="append", help="a prompt; repeat for a batch")
    add_sampling_arguments(p)
    p.add_argument("--stream", action="store_true", help="prompts one at a time, as generate --stream")
    add_dry_run_arguments(p)
    p.add_argument("--variant", choices=["block", "torch"], default="block", help="block: one all-reduce per block")
    p.add_argument("--dtype", choices=list(DTYPES), help="default: as generate's (float16 on GPUs, ...)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds a rank waits for the others")
    p.set_defaults(func=cmd_tensor_parallel)

    p = sub.add_parser("serve", help="an OpenAI-compatible server with continuous batching (notebook 10)")
    p.add_argument("--model", default="tiny", help="tiny, gpt-j-6b, a hub id, or a model folder")
    p.add_argument("--devices", required=True, help='e.g. "cpu", "3x4MiB" or "cuda:0=14GiB,cuda:1=14GiB"')
    p.add_argument("--slots", type=int, help="sequences served at once (default: as many as the budgets hold)")
    p.add_argument("--max-len", type=int, default=256, help="tokens a slot holds, prompt and answer")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require this key (Authorization: Bearer KEY); default: none")
    p.add_argument("--dtype", choices=list(DTYPES), help="default: as generate's (float16 on GPUs, ...)")
    p.add_argument("--delete-bin", action="store_true", help=DELETE_BIN_HELP)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("run-notebooks", help="execute notebooks headless (make demo, make notebooks)")
    p.add_argument("notebooks", nargs="+")
    p.add_argument("--out", help="folder for the executed copies and their figures")
    p.add_argument("--inplace", action="store_true", help="write the outputs back into the notebooks (after a minute "
                   "that checks the machine is quiet)")
    p.add_argument("--force", action="store_true", help="--inplace on a busy machine: the load goes into the metadata")
    p.set_defaults(func=cmd_run_notebooks)

    p = sub.add_parser("notebook-figure", help="save the figure an executed notebook shows (the README's picture)")
    p.add_argument("notebook")
    p.add_argument("name", help="the figure's name, as given to show_figure")
    p.add_argument("out", help="the PNG file to write")
    p.set_defaults(func=cmd_notebook_figure)

    p = sub.add_parser("generate", help="generate text through the model split over devices (sampling like the seed)")
    p.add_argument("--model", default="tiny", help="tiny, gpt-j-6b, a hub id, or a model folder")
    p.add_argument("--devices", required=True, help='e.g. "cpu", "4xcpu" or "cuda:0=6GiB,cuda:1=10GiB"')
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    add_sampling_arguments(p)
    p.add_argument("--stream", action="store_true", help="print tokens as they come (prompts one at a time)")
    p.add_argument("--delete-bin", action="store_true", help=DELETE_BIN_HELP)
    p.add_argument("--dtype", choices=list(DTYPES), help="default: float16 on GPUs, bfloat16 on the CPU for GPT-J-6B; "
                   "else the saved dtype (float32 for tiny)")
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m gptj_helpers`."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, OSError, MemoryError) as err:  # OSError: files, disk space, connections
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
