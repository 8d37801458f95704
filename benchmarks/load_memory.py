"""Peak host memory of placing one stage from safetensors, against the naive route (notebook 02).

Builds a GPT-J of a few hundred MB (float32 safetensors, random weights), plans 2 stages in bfloat16, and in
fresh subprocesses measures peak RSS over the interpreter's baseline while (a) `place_stages` loads only stage 1
and runs one forward pass through it, and (b) the naive route loads the whole float32 model, casts and keeps the
stage. Goal: (a) <= 1.1 x stage bytes + the largest single tensor.

    python benchmarks/load_memory.py [--width 768] [--layers 8]
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gptj_helpers as gh  # noqa: E402
from gptj_split.quiet import quiet_progress


def rss() -> int:
    return psutil.Process().memory_info().rss


def reset_peak() -> None:
    """Start a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss() -> int:
    """Peak RSS of this process since the last reset_peak (VmHWM; unlike ru_maxrss, not inherited at fork)."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM"))
    return int(line.split()[1]) * 1024


def forward_stage(model, plan, stage: int) -> None:
    """Run one forward pass through one stage's blocks (and head), so every weight is really read."""
    st = plan.devices[stage]
    hidden = torch.randn(1, 64, model.config.n_embd, dtype=torch.bfloat16)
    kwargs = {"position_ids": torch.arange(64)[None]}
    if hasattr(model.transformer, "rotary_emb"):  # transformers 5.24 hands each block the sin/cos; 5.17's make theirs
        kwargs["position_embeddings"] = model.transformer.rotary_emb(hidden, position_ids=kwargs["position_ids"])
    with torch.no_grad():
        for b in range(*st.blocks):
            out = model.transformer.h[b](hidden, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out  # 5.17's blocks return (hidden states, attention)
        if st.head:
            model.lm_head(model.transformer.ln_f(hidden))


def child(route: str, path: str, plan_json: str) -> None:
    import accelerate  # noqa: F401  (libraries are part of the baseline, not of the stage)
    import safetensors.torch  # noqa: F401
    from transformers import AutoConfig, GPTJForCausalLM

    plan = gh.Plan.from_json(plan_json)
    gh.meta_model(AutoConfig.from_pretrained(path))  # warm up lazy imports inside transformers
    base = rss()
    reset_peak()
    if route == "ours":
        model = gh.place_stages(path, plan, stages=[1])
    else:  # naive: load everything in float32, then cast; the other stage is simply not used
        model = GPTJForCausalLM.from_pretrained(path, dtype=torch.float32).to(torch.bfloat16)
    forward_stage(model, plan, 1)
    peak = peak_rss()
    print(json.dumps({"peak_over_baseline": peak - base}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    from transformers import GPTJConfig, GPTJForCausalLM

    config = GPTJConfig(vocab_size=50400, n_embd=args.width, n_layer=args.layers, n_head=12, rotary_dim=64,
                        n_positions=2048, bos_token_id=0, eos_token_id=0)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        with quiet_progress():
            GPTJForCausalLM(config).save_pretrained(tmp)
        size = sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors"))
        plan = gh.plan_split(config, "2xcpu", dtype=torch.bfloat16)
        stage = plan.devices[1]
        largest = max(p.numel() for p in gh.meta_model(config).parameters())
        print(f"model: {args.layers} layers x {args.width} wide, {size / 2**20:.0f} MiB of float32 safetensors; "
              f"stage 1 = blocks {stage.blocks[0]}-{stage.blocks[1] - 1} + head, "
              f"{stage.param_bytes / 2**20:.0f} MiB in bfloat16")
        print(f"largest single tensor: {largest * 4 / 2**20:.0f} MiB as stored (float32), "
              f"{largest * 2 / 2**20:.0f} MiB in bfloat16")
        goal = 1.1 * stage.param_bytes + largest * 4
        for route in ("ours", "naive"):
            out = subprocess.run([sys.executable, __file__, "--child", route, tmp, plan.to_json()],
                                 capture_output=True, text=True, timeout=600, check=True)
            peak = json.loads(out.stdout.strip().splitlines()[-1])["peak_over_baseline"]
            print(f"{route:5}: peak RSS over baseline {peak / 2**20:7.0f} MiB = {peak / stage.param_bytes:5.2f} x stage"
                  f" | goal (1.1 x stage + largest tensor) {goal / 2**20:.0f} MiB | ratio to goal {peak / goal:.2f}")


if __name__ == "__main__":
    main()
