"""README's "Which setup do I have?" table and every notebook's settings comment (notebooks 00 to 06, README)."""

from __future__ import annotations

from .hardware import Hardware, describe_hardware
from .devices import format_size, parse_devices
from .plan import as_config, plan_split


SETUPS = {  # README's "Which setup do I have?" and every notebook's settings comment: name -> (model, devices, dtype)
    "Colab, 1 x T4 16 GB": ("gpt-j-6b", "cuda:0=14GiB", "float16"),  # torch reports a T4 as 14.7 GiB
    "Kaggle, 2 x T4 16 GB": ("gpt-j-6b", "cuda:0=14GiB,cuda:1=14GiB", "float16"),
    "4 x 8 GB": ("gpt-j-6b", "4x7GiB", "float16"),
    "3 x 10 GB (the seed's box)": ("gpt-j-6b", "3x9GiB", "float16"),
    "8 x 4 GB": ("gpt-j-6b", "8x3.5GiB", "float16"),
    "CPU only, rehearsal (random weights)": ("gpt-j-6b-random", "2x7GiB", "bfloat16"),
    "CPU only (tiny default)": ("tiny", "3x4MiB", "float32"),
}
SETUP_HARDWARE = {  # the machine each setup describes, as hardware.describe_hardware reads it
    "Colab, 1 x T4 16 GB": "1 x T4", "Kaggle, 2 x T4 16 GB": "2 x T4", "4 x 8 GB": "4 x 8GB",
    "3 x 10 GB (the seed's box)": "3 x 10GB", "8 x 4 GB": "8 x 4GB", "CPU only, rehearsal (random weights)": "cpu",
    "CPU only (tiny default)": "cpu",
}


def setup_hardware(setup: str) -> Hardware:
    """The machine of one of SETUPS, described (README, tests)."""
    return describe_hardware(SETUP_HARDWARE[setup])


def setups_markdown(reserve: str = "1GiB", prompt_tokens: int = 512, max_new_tokens: int = 256) -> str:
    """The README's table of common setups, each planned by `plan_split` (README)."""
    rows = ["| setup | settings line | blocks per device | fullest device | tensor parallel (notebook 07) |",
            "|---|---|---|---|---|"]
    for name, (model, devices, dtype) in SETUPS.items():
        res = reserve if model == "gpt-j-6b" else "0"  # the reserve is for a GPU's CUDA context
        plan = plan_split(model, parse_devices(devices, setup_hardware(name)), dtype=dtype, reserve=res,
                          prompt_tokens=prompt_tokens if model != "tiny" else 16,
                          max_new_tokens=max_new_tokens if model != "tiny" else 48, model_name=model)
        blocks = " / ".join(str(st.blocks[1] - st.blocks[0]) for st in plan.devices)
        fullest = max(plan.devices, key=lambda st: st.fill)
        settings = f"`{settings_line(name)}`"
        heads = as_config(model).n_head  # tensor parallelism gives every device the same whole heads
        tp = ("one device: nothing to split" if len(plan.devices) == 1 else "yes" if heads % len(plan.devices) == 0
              else f"no: {heads} heads do not split {len(plan.devices)} ways")
        rows.append(f"| {name} | {settings} | {blocks} | {format_size(fullest.total_bytes)} of "
                    f"{format_size(fullest.budget_bytes)} ({fullest.fill:.0%}) | {tp} |")
    note = (f"Planned by `python -m gptj_helpers setups`: GPT-J-6B in float16 (bfloat16 for the CPU rehearsal) with "
            f"{prompt_tokens} prompt tokens, "
            f"{max_new_tokens} new tokens, batch 1 and a {reserve} reserve per GPU for the CUDA context and "
            "activations.")
    return "\n".join(rows) + "\n\n" + note


def settings_line(setup: str) -> str:
    """The line that switches a notebook's settings cell to one of SETUPS (notebooks 00 to 06, README)."""
    model, devices, dtype = SETUPS[setup]
    return f'MODEL = "{model}"; DEVICES = "{devices}"; DTYPE = torch.{dtype}'


def settings_comment() -> str:
    """The comment every notebook's settings cell carries: each setup's line, from SETUPS (notebooks 00 to 06)."""
    width = max(len(name) for name in SETUPS if SETUPS[name][0] != "tiny") + 1
    lines = ["# For GPT-J-6B, replace the MODEL line below by your setup's line (README: Which setup do I have?):"]
    lines += [f"#   {name + ':':{width}} {settings_line(name)}" for name in SETUPS if SETUPS[name][0] != "tiny"]
    lines += [
        "# Weights are downloaded once per machine (00 and 01 put them where every notebook finds them). Colab and",
        "# Kaggle start each session with an empty disk: keep them on your Google Drive with",
        '# os.environ["GPTJ_WEIGHTS"] = "/content/drive/MyDrive/gpt-j-6b" (after mounting it), or set MODEL to the',
        '# folder of a Kaggle dataset that holds them, like MODEL = "/kaggle/input/gpt-j-6b".']
    return "\n".join(lines)
