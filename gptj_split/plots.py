"""Notebook 04, part 2: figures. A plan's load per device (notebook 02), memory per device (planned beside
measured), who is busy when (a Gantt chart of every stage), utilisation and scaling; all but the plan drawn from
RunRecords, whichever way they were generated.
"""

from __future__ import annotations

import os
from pathlib import Path

from .plan import Plan
from .records import RunRecord
from .measure import utilisation


def size_unit(nbytes: float) -> tuple[str, int]:
    """MiB or GiB, whichever reads better for sizes up to `nbytes`."""
    return ("GiB", 2**30) if nbytes >= 2**30 else ("MiB", 2**20)


MEMORY_COLORS = {"parameters": "tab:blue", "KV cache": "tab:orange", "activations (estimate)": "tab:green",
                 "activations": "tab:green", "reserve": "tab:gray", "free": "whitesmoke"}


def plot_plan(plan: Plan, title: str | None = None):
    """Draw a plan: one bar per device, filled by embedding, blocks, head, KV cache and reserve, against its budget."""
    import matplotlib.pyplot as plt

    gib = 2**30
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(plan.devices), 3.6))
    colors = {"embedding": "tab:green", "blocks": "tab:blue", "head": "tab:purple", "KV cache": "tab:orange",
              "reserve": "tab:gray"}
    for i, s in enumerate(plan.devices):
        n_blocks = s.blocks[1] - s.blocks[0]
        parts = {"embedding": plan.module_bytes["embedding"] * s.embedding,
                 "blocks": plan.module_bytes["block"] * n_blocks, "head": plan.module_bytes["head"] * s.head,
                 "KV cache": s.kv_cache_bytes, "reserve": s.reserve_bytes}
        bottom = 0.0
        for label, nbytes in parts.items():
            ax.bar(i, nbytes / gib, bottom=bottom, color=colors[label], label=label if i == 0 else None,
                   edgecolor="white", width=0.7)
            bottom += nbytes / gib
        ax.hlines(s.budget_bytes / gib, i - 0.42, i + 0.42, colors="black", linewidth=2,
                  label="budget" if i == 0 else None)
        ax.text(i, bottom, f"{n_blocks} blocks\n{s.fill:.0%}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(plan.devices)), [f"{i}: {s.device}" for i, s in enumerate(plan.devices)], fontsize=8)
    ax.set_ylabel("memory (GiB)")
    ax.set_title(title or f"{plan.model} ({plan.dtype}) split over {len(plan.devices)} devices")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def plot_memory(record: RunRecord, plan: Plan | None = None):
    """Memory per device as stacked bars, planned beside measured (CUDA peak as a dot), against the budgets
    (notebook 04)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    plan = plan or record.plan
    rows = record.memory
    budgets = [r.budget_bytes for r in rows]
    top = max([b for b in budgets if b] + [r.total_bytes for r in rows])
    unit, scale = size_unit(top)
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(rows) + 2), 4))
    act = "activations (estimate)"
    for i, row in enumerate(rows):
        bars = []
        if plan:
            st = plan.devices[i]
            bars.append((i - 0.2, [("parameters", st.param_bytes), ("KV cache", st.kv_cache_bytes),
                                   ("reserve", st.reserve_bytes)], "planned"))
        bars.append((i + 0.2 if plan else i, [("parameters", row.param_bytes), ("KV cache", row.kv_cache_bytes),
                                              (act, row.activation_bytes)], "measured"))
        for x, parts, label in bars:
            bottom = 0
            for kind, value in parts:
                ax.bar(x, value / scale, 0.36, bottom=bottom / scale, color=MEMORY_COLORS[kind], edgecolor="black",
                       linewidth=0.3)
                bottom += value
            if budgets[i]:
                ax.bar(x, max(budgets[i] - bottom, 0) / scale, 0.36, bottom=bottom / scale, color="whitesmoke",
                       edgecolor="lightgray", linewidth=0.5, hatch="//")
            ax.text(x, bottom / scale, label, ha="center", va="bottom", fontsize=7, rotation=90)
        if budgets[i]:
            ax.hlines(budgets[i] / scale, i - 0.42, i + 0.42, colors="black", linestyles="--", linewidth=1.5)
        if row.cuda_peak_bytes is not None:
            ax.plot(i + 0.2 if plan else i, row.cuda_peak_bytes / scale, "kD", markersize=5)
    handles = [Patch(color=MEMORY_COLORS[k], label=k) for k in ("parameters", "KV cache", act, "reserve")]
    handles.append(Patch(facecolor="whitesmoke", edgecolor="lightgray", hatch="//", label="free"))
    handles.append(plt.Line2D([], [], color="black", linestyle="--", label="budget"))
    if any(r.cuda_peak_bytes is not None for r in rows):
        handles.append(plt.Line2D([], [], color="black", marker="D", linestyle="", label="CUDA peak (measured)"))
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_xticks(range(len(rows)), [f"stage {r.stage}\n{r.device}" for r in rows])
    ax.set_ylabel(f"memory ({unit})")
    ax.set_title(f"Memory per device: planned (left) and measured (right), {record.mode} run")
    fig.tight_layout()
    return fig


TIMELINE_COLORS = {"prefill": "tab:purple", "decode": "tab:blue", "send": "tab:orange", "recv": "tab:green",
                   "all-reduce": "tab:red", "all-gather": "tab:brown", "broadcast": "tab:olive"}  # notebook 07


def timeline_events(record: RunRecord, max_step: int = 3, first_step: int | None = None) -> list:
    """The timing events of steps `first_step` (default: the first decode step, if any) to `max_step`."""
    if first_step is None:
        first_step = 1 if any(e.step >= 1 for e in record.events) else 0
    events = [e for e in record.events if first_step <= e.step <= max_step]
    if not events:
        raise ValueError("this RunRecord has no timing events to draw")
    return events


def shared_span_ms(records: list[RunRecord], max_step: int = 3, first_step: int | None = None) -> float:
    """The longest of these runs' timelines in ms, the time axis they share in `plot_timelines` (notebooks 05, 07)."""
    spans = []
    for record in records:
        events = timeline_events(record, max_step, first_step)
        spans.append((max(e.end for e in events) - min(e.start for e in events)) * 1000)
    return max(spans)


def draw_timeline(ax, record: RunRecord, max_step: int = 3, first_step: int | None = None) -> None:
    """One run's Gantt chart on `ax`: each stage's compute intervals, and its sends and receives below them."""
    from matplotlib.patches import Patch

    events = timeline_events(record, max_step, first_step)
    t0 = min(e.start for e in events)
    stages = sorted({e.stage for e in events})
    several = len({e.micro_batch for e in events}) > 1
    span = max(e.end for e in events) - t0
    for e in events:
        key = e.phase if e.kind == "compute" else e.kind
        x, w = (e.start - t0) * 1000, (e.end - e.start) * 1000
        y, h = (e.stage - 0.38, 0.76) if e.kind == "compute" else (e.stage + (0.0 if e.kind == "send" else -0.38), 0.38)
        ax.broken_barh([(x, w)], (y, h), facecolors=TIMELINE_COLORS.get(key, "tab:gray"), edgecolor="black",
                       linewidth=0.3)
        if several and w > span * 1000 / 60:
            ax.text(x + w / 2, e.stage, str(e.micro_batch), ha="center", va="center", fontsize=7, color="white")
    kinds = sorted({e.phase if e.kind == "compute" else e.kind for e in events}, key=list(TIMELINE_COLORS).index)
    ax.legend(handles=[Patch(color=TIMELINE_COLORS[k], label=k) for k in kinds], fontsize=8, loc="upper left",
              bbox_to_anchor=(1.01, 1))
    ax.set_yticks(stages, [f"stage {s}" for s in stages])
    ax.set_ylim(max(stages) + 0.6, min(stages) - 0.6)  # stage 0 on top
    ax.set_xlabel("time since the first event shown (ms)")
    shown = sorted({e.step for e in events})
    steps = f"steps {shown[0]} to {shown[-1]}" if len(shown) > 1 else f"step {shown[0]}"
    ax.set_title(f"Who is busy when: {record.mode} run, {steps} (step 0 = the prefill)"
                 + (" (numbers: micro-batches)" if several else ""))


def plot_timeline(record: RunRecord, max_step: int = 3, first_step: int | None = None):
    """A Gantt chart of each stage's busy intervals and sends/receives, steps `first_step` to `max_step` (notebooks
    04, 05)."""
    return plot_timelines([record], max_step, first_step)


def plot_timelines(records: list[RunRecord], max_step: int = 3, first_step: int | None = None):
    """Several runs' Gantt charts stacked on one time axis, to compare them (notebooks 05, 07; the README's picture)."""
    import matplotlib.pyplot as plt

    heights = [0.55 * len({e.stage for e in timeline_events(r, max_step, first_step)}) + 1.3 for r in records]
    fig, axes = plt.subplots(len(records), 1, figsize=(9, sum(heights) + 0.5), sharex=True, squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, record in zip(axes[:, 0], records):
        draw_timeline(ax, record, max_step, first_step)
    span = shared_span_ms(records, max_step, first_step)
    axes[-1, 0].set_xlim(0, span * 1.02)
    for ax in axes[:-1, 0]:
        ax.set_xlabel("")
    fig.tight_layout()
    return fig


def plot_utilisation(record: RunRecord):
    """Utilisation per device as bars, with 1/n, the most a naive split of n stages can give each (notebook 04)."""
    import matplotlib.pyplot as plt

    used = utilisation(record)
    n = len(used)
    fig, ax = plt.subplots(figsize=(max(4, 0.9 * n + 2), 3.5))
    ax.bar(range(n), [u * 100 for u in used], color="tab:blue", label="busy time / wall time")
    ax.axhline(100 / n, color="tab:red", linestyle="--", label=f"naive split ideal: 1/n = {100 / n:.0f}%")
    ax.set_xticks(range(n), [f"stage {s}" for s in range(n)])
    ax.set_ylabel("utilisation (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Utilisation per device, {record.mode} run (all stages together: {sum(used):.0%})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_scaling(rows: list[dict], fixed_devices: int = 4):
    """Tokens/s and per-token latency vs number of devices and vs prompt length, from `measure_scaling` (notebook
    04)."""
    import matplotlib.pyplot as plt

    by_n = sorted({r["n_devices"]: r for r in rows if r["prompt_tokens"] == rows[0]["prompt_tokens"]}.values(),
                  key=lambda r: r["n_devices"])
    by_p = sorted([r for r in rows if r["n_devices"] == fixed_devices], key=lambda r: r["prompt_tokens"])
    fig, axes = plt.subplots(2, 2, figsize=(10, 6), sharex="col")
    for col, (data, key, label) in enumerate([(by_n, "n_devices", "number of devices (stages)"),
                                              (by_p, "prompt_tokens", "prompt length (tokens)")]):
        x = [r[key] for r in data]
        axes[0, col].plot(x, [r["tokens_per_second"] for r in data], "o-", label="decode tokens/s")
        axes[1, col].plot(x, [r["ms_per_token"] for r in data], "o-", label="per decode token")
        axes[1, col].plot(x, [r["time_to_first_token_ms"] for r in data], "s--", label="to the first token")
        axes[0, col].set_ylabel("tokens/s")
        axes[1, col].set_ylabel("latency (ms)")
        axes[1, col].set_xlabel(label)
        if key == "n_devices":
            axes[1, col].set_xticks(x)
        else:
            axes[1, col].set_xscale("log", base=2)
            axes[1, col].set_xticks(x, [str(v) for v in x])
            axes[1, col].minorticks_off()
        for ax in axes[:, col]:
            ax.set_ylim(bottom=0)
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
    axes[0, 0].set_title(f"vs devices (prompt of {by_n[0]['prompt_tokens']} tokens)" if by_n else "vs devices")
    axes[0, 1].set_title(f"vs prompt length ({fixed_devices} devices)")
    fig.suptitle("Naive split: speed is set by the sum of the stages, not by their number")
    fig.tight_layout()
    return fig


def output_dir() -> Path | None:
    """Where notebooks save figures: $GPTJ_HELPERS_OUT when set (`make demo` sets build/), else nowhere."""
    out = os.environ.get("GPTJ_HELPERS_OUT")
    return Path(out) if out else None


def show_figure(fig, name: str) -> Path | None:
    """Show a figure as a bare PNG (no "<Figure size ...>" text for nbval) and save it under `output_dir()` if set."""
    import base64
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    path = None
    out = output_dir()
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{name}.png"
        path.write_bytes(buffer.getvalue())
    plt.close(fig)
    try:
        from IPython.display import display

        display({"image/png": base64.b64encode(buffer.getvalue()).decode()}, raw=True)
    except ImportError:  # plain Python: saving is all we can do
        pass
    return path


def save_notebook_figure(notebook: str | Path, name: str, out: str | Path) -> Path:
    """Write the PNG that a notebook's cell showing figure `name` holds, as executed, to `out` (the README's
    picture is notebook 05's timeline, refreshed by `make notebooks`)."""
    import base64
    import json

    cells = json.loads(Path(notebook).read_text())["cells"]
    for cell in cells:
        if cell["cell_type"] == "code" and f'"{name}"' in "".join(cell["source"]):
            pictures = [o["data"]["image/png"] for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
            if not pictures:
                raise ValueError(f"{notebook}: the cell that shows {name!r} has no picture: execute the notebook first")
            out = Path(out)
            tmp = out.with_suffix(".tmp")
            tmp.write_bytes(base64.b64decode(pictures[0]))
            os.replace(tmp, out)
            return out
    raise ValueError(f"{notebook}: no code cell shows a figure named {name!r}")
