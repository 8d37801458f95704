"""Notebook 05, part 1: one pipeline stage. A stage process holds transformers' `GPTJModel` with only its own blocks
(the embedding on the first stage, the final norm and head on the last), computes them (`forward_stage`), and sends
hidden states on (token ids back to the first stage) with `torch.distributed`'s send and receive (Inbox, Outbox).
The schedule that drives them is pipeline.py's `run_stage`.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch

from .models import eos_token_id, gptj_modeling
from .plan import Plan
from .records import EventClock
from .place import WeightReader, block_prefix, replace_module, tensor_bytes
from .sampling import position_ids


def check_stage_count(n: int, n_layer: int) -> None:
    """A pipeline stage needs at least one block: refuse more stages than blocks (notebook 05)."""
    if n > n_layer:
        raise ValueError(f"{n} stages but the model has only {n_layer} blocks: use at most {n_layer} devices")


def check_pipeline_plan(plan: Plan, n_layer: int, world_size: int | None = None) -> None:
    """Refuse a plan the pipeline cannot run, before anything is loaded (notebook 05)."""
    n = len(plan.devices)
    check_stage_count(n, n_layer)
    if plan.devices[-1].blocks[1] != n_layer:
        raise ValueError(f"the plan covers {plan.devices[-1].blocks[1]} blocks but the model has {n_layer}")
    if world_size is not None and world_size != n:
        raise ValueError(f"{world_size} process(es) for {n} stage(s): start one process per device "
                         f"(torchrun --nproc-per-node {n}, or nodes x processes = {n})")


@dataclass
class PipelineStage:
    """What one stage process holds: transformers' GPTJModel with this stage's blocks, the head on the last stage,
    and its place (notebook 05)."""

    rank: int
    world_size: int
    device: torch.device
    dtype: torch.dtype
    model: torch.nn.Module  # GPTJModel of this stage's blocks; wte real on the first stage only, ln_f on the last
    lm_head: torch.nn.Module | None
    param_bytes: int
    eos_token_id: int
    comm_device: torch.device  # where tensors cross: the GPU for NCCL, the CPU for gloo

    @property
    def config(self):
        """The stage model's config: the model's, with n_layer = this stage's block count (sizes its KV caches)."""
        return self.model.config

    @property
    def embeds(self) -> bool:
        """Whether this stage turns token ids into hidden states (the first stage)."""
        return self.model.wte.weight.device.type != "meta"


def stage_tensor_name(local: str, first_block: int) -> str:
    """The whole model's name of a stage model's tensor: `h.0.attn.q_proj.weight` -> `transformer.h.7.attn...`."""
    if local.startswith("h."):
        index, rest = local[2:].split(".", 1)
        return f"transformer.h.{first_block + int(index)}.{rest}"
    return local if local.startswith("lm_head.") else f"transformer.{local}"


def load_stage(model_path, plan: Plan, rank: int, dtype: torch.dtype, device: torch.device | str,
               comm_device: str = "cpu", transform=None) -> PipelineStage:
    """Build stage `rank` alone: a GPTJModel of its block count on the meta device, then only its own tensors
    loaded (or made from seeds) onto `device`, the rank's own (the runtime's decision), one at a time;
    `transform(name, module)` as in `place_stages`, on each module inside the blocks once loaded (notebooks 05,
    08)."""
    import copy

    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    GPTJModel = gptj_modeling().GPTJModel

    weights = WeightReader(model_path)
    st, device = plan.devices[rank], torch.device(device)
    a, b = st.blocks
    config = copy.deepcopy(weights.config)
    config.n_layer = b - a
    with init_empty_weights():  # parameters on meta; buffers (the rotary sin/cos table) are computed for real
        model = GPTJModel(config)
        lm_head = torch.nn.Linear(config.n_embd, config.vocab_size) if st.head else None
    if not st.head:
        model.ln_f = torch.nn.Identity()
    owned = [(model, name, p) for name, p in model.named_parameters() if st.embedding or not name.startswith("wte.")]
    owned += [(lm_head, name, p) for name, p in (lm_head.named_parameters() if lm_head is not None else [])]
    names = [stage_tensor_name(n if module is model else f"lm_head.{n}", a) for module, n, _ in owned]
    weights.check(names)
    for i, ((module, local, param), name) in enumerate(zip(owned, names)):
        set_module_tensor_to_device(module, local, device, value=weights.read(name, param.shape, dtype, device),
                                    dtype=dtype)
        owner = local.rpartition(".")[0]
        if transform is not None and block_prefix(name) and (i + 1 == len(names) or
                                                                 owned[i + 1][1].rpartition(".")[0] != owner):
            replace_module(model, owner, transform(name.rpartition(".")[0], model.get_submodule(owner)))
    for name, _ in list(model.named_buffers()):  # rotary sin/cos: one table (transformers 5.24) or one per block (5.17)
        set_module_tensor_to_device(model, name, device)
    eos = eos_token_id(config)
    modules = [model] + ([lm_head] if lm_head is not None else [])
    params = sum(tensor_bytes(p) for m in modules for p in m.parameters() if p.device.type != "meta")
    return PipelineStage(rank, len(plan.devices), device, dtype, model.eval(),
                         lm_head.eval() if lm_head is not None else None, params, eos, torch.device(comm_device))


def new_stage_cache(stage: PipelineStage):
    """An empty KV cache for this stage's layers, one per micro-batch (notebook 05)."""
    from transformers import DynamicCache

    return DynamicCache(config=stage.config)


@functools.cache  # asked on every forward step: inspect the signature once
def cache_keyword() -> str:
    """What GPTJModel.forward calls its KV cache: `cache` in transformers 5.24, `past_key_values` before."""
    GPTJModel = gptj_modeling().GPTJModel

    return "cache" if "cache" in inspect.signature(GPTJModel.forward).parameters else "past_key_values"


def forward_stage(stage: PipelineStage, x: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
    """Run one stage with transformers' own GPT-J forward (causal mask, rotary embeddings): token ids or hidden
    states in; hidden states, or the last position's float32 logits, out."""
    positions = position_ids(mask, x.shape[1])
    if len(stage.model.h):
        inputs = {"input_ids": x} if stage.embeds else {"inputs_embeds": x}
        hidden = stage.model(**inputs, attention_mask=mask, position_ids=positions, use_cache=True,
                             **{cache_keyword(): cache}).last_hidden_state
    else:  # a stage without blocks: only the embedding or the head
        hidden = stage.model.ln_f(stage.model.wte(x) if stage.embeds else x)
    if stage.lm_head is None:
        return hidden
    return stage.lm_head(hidden[:, -1:, :])[:, -1].to(copy=True, dtype=torch.float32)


class Inbox:
    """The messages a stage will receive from one neighbour, in order; receives are posted ahead (`irecv`)."""

    def __init__(self, stage: PipelineStage, src: int, shapes: list[tuple[tuple[int, ...], torch.dtype]],
                 clock: EventClock, ahead: int = 2):
        self.stage, self.src, self.shapes, self.clock, self.ahead = stage, src, shapes, clock, ahead
        self.posted: list[tuple[torch.Tensor, object]] = []
        self.next = 0

    def post(self) -> None:
        import torch.distributed as dist

        while self.next < len(self.shapes) and len(self.posted) < self.ahead:
            shape, dtype = self.shapes[self.next]
            buffer = torch.empty(shape, dtype=dtype, device=self.stage.comm_device)
            self.posted.append((buffer, dist.irecv(buffer, src=self.src)))
            self.next += 1

    def get(self, step: int, micro_batch: int) -> torch.Tensor:
        """Wait for the next message (timed as a "recv" event) and post the following receives; after a stop
        message (negative numbers) nothing more is posted, so no receive is left waiting."""
        self.post()
        start = self.clock.stamp(self.stage.comm_device)
        buffer, work = self.posted.pop(0)
        work.wait()
        if buffer.dtype == torch.long and bool((buffer < 0).all()):
            self.next = len(self.shapes)
        self.post()
        self.clock.note(self.stage.rank, start, self.stage.comm_device, "recv", micro_batch, step)
        return buffer.to(self.stage.device)


class Outbox:
    """Sends that overlap the next compute (`isend`); buffers are kept alive until their send completes."""

    def __init__(self, stage: PipelineStage, clock: EventClock, limit: int = 8):
        self.stage, self.clock, self.limit, self.pending = stage, clock, limit, []

    def send(self, tensor: torch.Tensor, dst: int, step: int, micro_batch: int) -> None:
        import torch.distributed as dist

        start = self.clock.stamp(self.stage.comm_device)
        buffer = tensor.to(self.stage.comm_device).contiguous()
        self.pending.append((buffer, dist.isend(buffer, dst=dst)))
        while len(self.pending) > self.limit:
            self.pending.pop(0)[1].wait()
        self.clock.note(self.stage.rank, start, self.stage.comm_device, "send", micro_batch, step)

    def flush(self) -> None:
        while self.pending:
            self.pending.pop(0)[1].wait()
