"""Helpers for the notebook series "GPT-J-6B when no single GPU is big enough": what every notebook imports
(`import gptj_helpers as gh`), and the series' table of contents. The code lives in the package `gptj_split/`,
one file per chapter, each readable in one sitting; a file imports only files of its own or earlier chapters.

| notebook                     | file(s) in gptj_split/                                                           |
|------------------------------|----------------------------------------------------------------------------------|
| 00 start here                | models.py (configs, the tiny default, sizes, dtypes), devices.py (budgets, RSS)  |
|                              | hardware.py (what a node has: read once from torch, or described: "2 x T4")      |
| 00, 01 download and convert  | hub.py (names to folders, hub download, load_*), convert.py (JAX slim),          |
|                              | convert_bin.py (pytorch_model*.bin to safetensors, once, beside them)            |
|                              | random_models.py (seeded random GPT-Js: gpt-j-6b-random, tiny, bench models)     |
| 02 layer splitting           | plan.py (Plan, min-max planner, refusals), place.py (load per stage, hooks)      |
|                              | setups.py (the README's setups table, every notebook's settings comment)         |
| 03 generation                | sampling.py (Sampling, prompt checks), generate.py (generate_text, stage timing) |
| 03 to 05 (shared)            | records.py (RunRecord, MemoryRow, TimingEvent)                                   |
| 04 memory and timing         | measure.py (estimates vs measurements, scaling), plots.py (every figure)         |
| 05 pipeline parallelism      | launch.py (each rank's device, backend, dtype, budget: decided once; dry run)    |
|                              | ranks.py (one runtime for n ranks: start or join, one deadline, typed errors)    |
|                              | jobs.py (prompts to jobs, picking tokens, reports to a RunRecord)                |
|                              | stage.py (one stage: GPTJModel, send/recv), pipeline.py (the pipeline client)    |
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
| command line, notebook runs  | cli.py (`python -m gptj_helpers --help`), runner.py (notebooks run headless)     |

Nothing runs at import: transformers and friends are imported inside the functions that need them
(preload.py, imported only by that fork server, is the exception: importing it is its work).
Patch a name where the package looks it up (`gptj_split.pipeline.start_ranks`: pipeline.py calls the
runtime's `start_ranks` by that name), not here: this module only re-exports, so a patch on `gh.NAME` changes
nothing the package itself calls.
"""

from __future__ import annotations

import sys

from gptj_split.models import (GPTJ_6B_REPO, GPTJ_6B_REVISION, TINY_SEED, TINY_VERSION, EOS_TOKEN, REPO_DIR,
                               TINY_TRAINED, DTYPES, GPTJ_6B_RANDOM, gptj_6b_config, tiny_config, training_text,
                               train_tiny_tokenizer, quiet_progress, NOISY_LOGGERS, quiet_imports, gptj_modeling,
                               random_tiny_model, write_tiny_model, cache_dir, build_atomically, build_lock,
                               tiny_folder, tiny_model_path, meta_model, module_sizes, count_parameters, mini_config,
                               sliced_config, reference_blocks, is_gptj_6b, eos_token_id, default_dtype, as_dtype,
                               dtype_name,
                               RANDOM_WEIGHTS, seeded_tensor)
from gptj_split.hardware import (BFLOAT16_CAPABILITY, Card, CARDS, Hardware, describe_hardware, read_hardware)
from gptj_split.devices import (UNITS, parse_size, format_size, Device, available_memory, list_devices, GPU_RESERVE,
                                DeviceEntry, read_spec, resolve_entries, parse_devices, spec_of, release_memory,
                                trim_host_heap, describe_environment, reset_peak_rss, peak_rss, card_capability,
                                check_dtype_on_devices)
from gptj_split.hub import (WEIGHT_PATTERNS, hub_id, resolve_model, load_config, load_tokenizer, load_model,
                            quiet_warnings, download_gptj, download_model, transport_errors, model_files_complete,
                            check_online, WEIGHTS_VARIABLE, weights_dir, small_files)
from gptj_split.convert import (GPTJ_6B_JAX_CONFIG, JAX_PIECES, jax_config_of, hf_config_of, JaxLeaf, jax_leaves,
                                split_pieces, target_group, write_safetensors_shards, check_finite, refuse_existing,
                                read_npz_array, convert_jax_checkpoint, write_jax_checkpoint)
from gptj_split.convert_bin import (BIN_INDEX, SAFETENSORS_INDEX, MASK_BUFFERS, COPIED_SUFFIXES, files_complete,
                                    safetensors_complete, bin_files, read_bin, bin_sources, bin_groups, files_label,
                                    copy_modes, copy_side_files, convert_to_safetensors, writable, converted_copy,
                                    check_disk, convert_in_place, check_conversion, delete_bin, placeable_folder)
from gptj_split.random_models import (write_random_model, random_gptj_folder, random_gptj_files, write_seeded_files,
                                      save_tokenizer, build_seeded_model, check_room, make_tiny_gptj, mini_gptj_folder,
                                      bench_config, write_bench_model)
from gptj_split.plan import (StagePlan, Plan, kv_cache_bytes_per_layer, as_config, plan_split, explain_infeasible,
                             format_plan, accelerate_plan, map_device, QUANTIZED_FORMATS, check_weights, linear_bytes,
                             planned_sizes, check_free_memory)
from gptj_split.records import (TimingEvent, MemoryRow, RunRecord, EventClock, compare_outputs)
from gptj_split.place import (stage_parameter_names, move_to, boundary_hook, WeightReader, place_stages, hook_stages,
                              plan_of, tensor_bytes, stored_bytes, kv_bytes, measure_memory, SplitCheck, check_split,
                              block_prefix, replace_module)
from gptj_split.setups import (SETUPS, SETUP_HARDWARE, setup_hardware, setups_markdown, settings_line,
                               settings_comment)
from gptj_split.sampling import (SAMPLING_DEFAULTS, Sampling, as_sampling, check_max_new_tokens, check_sampling,
                                 check_prompts, check_generation, pad_left, position_ids)
from gptj_split.generate import (plan_modules, stage_modules, StageRecorder, TokenTimes, make_streamer, generate_text,
                                 seeded, format_timing, run_generate)
from gptj_split.measure import (measure_command, utilisation, prompt_of_length, measure_scaling, copy_seconds,
                                compare_estimates, format_estimates, decode_read_bytes, measure_weight_bandwidth,
                                format_bandwidth, QUIET_SHARE, LoadWatch)
from gptj_split.plots import (size_unit, MEMORY_COLORS, plot_plan, plot_memory, TIMELINE_COLORS, timeline_events,
                              shared_span_ms, draw_timeline, plot_timeline, plot_timelines, plot_utilisation,
                              plot_scaling, output_dir, show_figure, save_notebook_figure)
from gptj_split.launch import (Launch, RankPlace, notebook_launch, torchrun_launch, decide_ranks, pick_backend,
                               notebook_places, torchrun_places)
from gptj_split.ranks import (DEFAULT_TIMEOUT, DEFAULT_DEADLINE, CONFIG_ERRORS, LaunchOptions, RankError, RankJob,
                              RankContext, load_timeout, configure_worker,
                              join_ranks, run_jobs,
                              serve_torchrun, process_context, start_ranks, leave_process, is_neighbour_error,
                              free_port)
from gptj_split.jobs import (PipelineJob, make_job, model_folder, prompts_job, prompt_jobs, next_tokens,
                             merge_results)
from gptj_split.stage import (check_stage_count, check_pipeline_plan, PipelineStage, stage_tensor_name, load_stage,
                              new_stage_cache, cache_keyword, forward_stage, Inbox, Outbox, run_stage)
from gptj_split.relay import (RelayEnd, TokenRelay, PrintRelay)
from gptj_split.pipeline import (PIPELINE_TIMEOUT, PipelineError, PipelineSettings, pipeline_settings, pipeline_job,
                                 prepare_pipeline, plan_pipeline, serve_pipeline, run_pipeline_jobs, run_pipeline,
                                 pipeline_generate, pipeline_dry_run)
from gptj_split.compare import (pinned, time_phases, measure_module_seconds, balanced_plans, SpeedupRun,
                                measure_pipeline_speedup, prefill_bubble)
from gptj_split.shards import (VARIANTS, COLUMNS, ROWS, shard_dim, shard_of, rank_counts, check_head_split,
                               rank_parameter_bytes, plan_tensor_parallel, RankModel, tensor_parallel_plan,
                               time_collective, one_reduce_per_block, gather_vocabulary, cut_linear, build_rank_model,
                               forward_rank)
from gptj_split.tensor_parallel import (TP_VARIANT, TensorParallelJob, tensor_parallel_job, TensorParallelError,
                                        TensorParallelSettings, tensor_parallel_settings, tensor_parallel_rank_job,
                                        check_variant_backend, prepare_tensor_parallel, plan_for_jobs,
                                        serve_tensor_parallel, run_rank, merge_rank_results, run_tensor_parallel_jobs,
                                        run_tensor_parallel, tensor_parallel_generate, tensor_parallel_dry_run)
from gptj_split.tp_compare import (COMM_KINDS, decode_seconds, decode_seconds_of, comm_per_token, compare_splits,
                                   format_comparison, greedy_agreement)
from gptj_split.widget import (StopOnEvent, format_run_line, PromptWidget, prompt_widget)
from gptj_split.quantize import (BACKENDS, INSTALL_HINT, MissingBackend, quiet_backends, import_backend,
                                 backend_versions, check_backend, quantize_linear, quantize_block, BlockQuantizer,
                                 quantizer_for, place_quantized, has_weight_files, pretrained_config, load_pretrained,
                                 quantized_bytes)
from gptj_split.quality import (FORMAT_ROWS, GREEDY_PROMPTS, PUBLISHED_QUALITY, held_out_ids, load_format,
                                window_logits, greedy_ids, tokens_before_divergence, compare_logits, measure_quality,
                                format_quality, DecodeTime, KERNELS, time_decode, format_decode, MEMORY_SETUPS,
                                memory_table)
from gptj_split.compiled import (MAX_GRAPHS, CompiledDecode, compile_problem, compile_stages, generate_compiled,
                                 compare_runs)
from gptj_split.roofline import (read_bandwidth, bytes_per_token, decode_limit, format_roofline, profile_decode,
                                 quiet_native_stderr)
from gptj_split.runner import run_notebooks, run_notebook, check_quiet
from gptj_split.cli import (cmd_make_tiny, cmd_download, cmd_convert_jax,
                            cmd_convert_bin,
                            cmd_devices, cmd_run_notebooks, cmd_plan, cmd_generate, cmd_setups, read_prompts,
                            under_torchrun, launch_ranks, cmd_pipeline, cmd_tensor_parallel, sampling_of,
                            add_sampling_arguments, DELETE_BIN_HELP, build_parser, main)

if __name__ == "__main__":
    sys.exit(main())
