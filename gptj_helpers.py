"""Helpers for the notebook series "GPT-J-6B when no single GPU is big enough": what every notebook imports
(`import gptj_helpers as gh`), and the series' table of contents. The code lives in the package `gptj_split/`,
one file per chapter, each readable in one sitting; a file imports only files of its own or earlier chapters.

| notebook                     | file(s) in gptj_split/                                                           |
|------------------------------|----------------------------------------------------------------------------------|
| 00 start here                | models.py (configs, sizes, dtypes), tiny.py (the tiny default, built or shipped) |
|                              | hardware.py (what a node has: read once from torch, or described: "2 x T4")      |
|                              | devices.py (device specs read by one function, budgets, RSS)                     |
|                              | files.py (cache folder, builds once, locks, atomic writes), quiet.py (log noise) |
| 00, 01 download and convert  | hub.py (names to folders, hub download, load_*), convert.py (JAX slim),          |
|                              | convert_bin.py (pytorch_model*.bin to safetensors, once, beside them)            |
|                              | random_models.py (seeded random GPT-Js: gpt-j-6b-random, tiny, bench models)     |
| 02 layer splitting           | plan.py (Plan, min-max planner, refusals), place.py (load per stage, hooks)      |
|                              | hooks.py (the one hook style: ModuleHook's pre_forward/post_forward, add_hook)   |
|                              | setups.py (the README's setups table, every notebook's settings comment)         |
| 03 generation                | sampling.py (Sampling, prompt checks), generate.py (generate_text, stage timing) |
| 03 to 05 (shared)            | records.py (RunRecord, MemoryRow, TimingEvent)                                   |
| 04 memory and timing         | measure.py (estimates vs measurements, scaling), plots.py (every figure)         |
| 05 pipeline parallelism      | launch.py (each rank's device, backend, dtype, budget: decided once; dry run)    |
|                              | ranks.py (what every rank does, however started: join, load, run, typed errors), |
|                              | processes.py (the rank processes started from here; one deadline; failures named)|
|                              | jobs.py (what both clients share: GenerationJob, RankReport, picking tokens)     |
|                              | stage.py (one stage: GPTJModel, send/recv), pipeline.py (the client, schedule)   |
| 05 to 07 (shared)            | relay.py (tokens streamed to this process, Stop sent back; printed by torchrun)  |
|                              | preload.py (what the CPU ranks' fork server imports once, before forking)        |
| 05 speedup, measured live    | compare.py (naive split on 1 and 2 threads vs the pipeline, the bubble)          |
| 06 prompt widget             | widget.py                                                                        |
| 07 tensor parallelism        | shards.py (cut blocks by heads, planner), tensor_parallel.py (the client: ranks) |
|                              | tp_compare.py (naive split, pipeline and tensor parallel, measured side by side) |
| 08 quantization              | quantize.py (backends, per-block quantize-after-load, from_pretrained),          |
|                              | quality.py (quality and speed of each weight format)                             |
| 09 how fast one prompt goes  | roofline.py (bytes per token against bandwidth, where a step's time goes),       |
|                              | compiled.py (the decode step compiled over a static KV cache)                    |
| 10 several people at once    | slots.py (the KV cache of slots), scheduler.py (continuous batching, one step at |
|                              | a time), server.py (OpenAI-compatible, FastAPI on uvicorn)                       |
| command line, notebook runs  | cli.py (`python -m gptj_helpers --help`), runner.py (notebooks run headless)     |
|                              | cli_ranks.py (pipeline and tensor-parallel: from here, under torchrun, dry run)  |

Below, grouped by the notebook that first uses them, are the names the notebooks, the README and the exercises use
(`gh.NAME`): the series' tools. Everything else is plumbing; benchmarks and tests import it from
`gptj_split.<file>`. Nothing runs at import: transformers and friends are imported inside the functions that need
them (preload.py, imported only by that fork server, is the exception: importing it is its work).
Patch a name where the package looks it up (`gptj_split.pipeline.start_ranks`: pipeline.py calls the
runtime's `start_ranks` by that name), not here: this module only re-exports, so a patch on `gh.NAME` changes
nothing the package itself calls.
"""

from __future__ import annotations

import sys

# 00 start here
from gptj_split.devices import (Device, describe_environment, format_size, list_devices, parse_devices)
from gptj_split.hardware import (Card, Hardware, describe_hardware, read_hardware)
from gptj_split.hub import (load_config, load_model, load_tokenizer)
from gptj_split.models import (GPTJ_6B_RANDOM, gptj_6b_config, module_sizes, reference_blocks)

# 01 download and convert
from gptj_split.convert import (GPTJ_6B_JAX_CONFIG, convert_jax_checkpoint, hf_config_of, jax_leaves, split_pieces,
                                write_jax_checkpoint)
from gptj_split.convert_bin import convert_to_safetensors
from gptj_split.hub import (check_online, download_gptj)
from gptj_split.measure import measure_command
from gptj_split.models import tiny_config

# 02 layer splitting
from gptj_split.compare import measure_module_seconds
from gptj_split.place import BoundaryHook, check_split, measure_memory, move_to, place_stages
from gptj_split.plan import (Plan, StagePlan, accelerate_plan, format_plan, plan_split)
from gptj_split.plots import (plot_plan, show_figure)
from gptj_split.setups import (SETUPS, settings_line, setups_markdown)

# 03 generation
from gptj_split.cli import main
from gptj_split.generate import (format_timing, generate_text)
from gptj_split.measure import decode_read_bytes
from gptj_split.records import (EventClock, MemoryRow, RunRecord, TimingEvent, compare_outputs)
from gptj_split.sampling import Sampling

# 04 memory and timing
from gptj_split.devices import release_memory
from gptj_split.measure import (compare_estimates, format_bandwidth, format_estimates, measure_scaling,
                                measure_weight_bandwidth, prompt_of_length, utilisation)
from gptj_split.plots import (plot_memory, plot_scaling, plot_timeline, plot_utilisation)

# 05 pipeline parallelism
from gptj_split.compare import (measure_pipeline_speedup, prefill_bubble)
from gptj_split.hub import resolve_model
from gptj_split.jobs import (GenerationJob, make_job, prompts_job)
from gptj_split.launch import RankPlace, launch_notes
from gptj_split.pipeline import (PipelineError, pipeline_dry_run, run_pipeline, run_stage)
from gptj_split.plots import plot_timelines
from gptj_split.random_models import mini_gptj_folder
from gptj_split.ranks import (LaunchOptions, RankError)
from gptj_split.sampling import (check_generation, pad_left)

# 06 prompt widget
from gptj_split.pipeline import pipeline_generate
from gptj_split.tensor_parallel import tensor_parallel_generate
from gptj_split.widget import (StopOnEvent, format_run_line, prompt_widget)

# 07 tensor parallelism
from gptj_split.models import meta_model
from gptj_split.random_models import (bench_config, write_bench_model)
from gptj_split.shards import (AllReduceBlock, HoldPartialSum, build_rank_model, one_reduce_per_block,
                               plan_tensor_parallel, rank_counts, rank_parameter_bytes, shard_dim, shard_of,
                               tensor_parallel_plan)
from gptj_split.tensor_parallel import (TensorParallelError, TensorParallelJob, run_tensor_parallel,
                                        tensor_parallel_dry_run, variant_job)
from gptj_split.tp_compare import (comm_per_token, compare_splits, decode_seconds_of, format_comparison)

# 08 quantization
from gptj_split.plan import planned_sizes
from gptj_split.quality import (FORMAT_ROWS, PUBLISHED_QUALITY, format_quality, measure_quality, memory_table)
from gptj_split.quantize import (backend_versions, has_weight_files, load_pretrained, place_quantized,
                                 pretrained_config, quantized_bytes, quantizer_for, quiet_backends)

# 09 one prompt's speed
from gptj_split.compiled import (compile_stages, generate_compiled)
from gptj_split.roofline import (bytes_per_token, decode_limit, format_roofline, profile_decode, read_bandwidth)

# README
from gptj_split.devices import trim_host_heap
from gptj_split.random_models import random_gptj_files

if __name__ == "__main__":
    sys.exit(main())
