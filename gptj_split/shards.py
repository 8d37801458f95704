"""Notebook 07, part 1: the shards of tensor parallelism. Every rank holds transformers' GPT-J with each block's
matrices cut by whole attention heads (q/k/v, out_proj) and MLP columns (fc_in, fc_out), and all ranks compute every
token together, adding their partial sums with all-reduces: torch's `parallelize_module` (one all-reduce per layer,
two per block) or the hand-written variant (GPT-J's attention and MLP read the same input, so one all-reduce per
block). The embedding is replicated on every rank; the head is split by vocabulary and its logits gathered.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .models import as_dtype, default_dtype, dtype_name, eos_token_id, meta_model, gptj_modeling
from .devices import Device, format_size, parse_devices
from .hooks import ModuleHook, add_hook
from .plan import Plan, StagePlan, as_config, kv_cache_bytes_per_layer
from .records import EventClock
from .place import WeightReader, tensor_bytes
from .sampling import position_ids

VARIANTS = ("torch", "block")  # torch: parallelize_module, an all-reduce per layer; block: by hand, one per block
COLUMNS = ("attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight", "mlp.fc_in.weight", "mlp.fc_in.bias",
           "lm_head.weight", "lm_head.bias")  # cut along their output features (dim 0)
ROWS = ("attn.out_proj.weight", "mlp.fc_out.weight")  # cut along their input features (dim 1)


def shard_dim(name: str) -> int | None:
    """The dimension a parameter is cut along (0: output features, 1: input features), None if every rank holds it
    all (notebook 07)."""
    if name.endswith(COLUMNS):
        return 0
    return 1 if name.endswith(ROWS) else None


def shard_of(tensor: torch.Tensor, name: str, rank: int, ranks: int) -> torch.Tensor:
    """Rank `rank`'s piece of a whole parameter, cut as torch's DTensor cuts it (`torch.chunk`) (notebook 07)."""
    dim = shard_dim(name)
    return tensor if dim is None or ranks == 1 else tensor.chunk(ranks, dim)[rank]


def rank_counts(config) -> list[int]:
    """The rank counts that split the model's attention heads evenly (notebook 07)."""
    return [r for r in range(1, config.n_head + 1) if config.n_head % r == 0]


def check_head_split(config, ranks: int, model_name: str = "the model") -> None:
    """Refuse a rank count that cannot give every rank the same whole heads, naming the counts that work (notebook
    07)."""
    counts = ", ".join(map(str, rank_counts(config)))
    inner = config.n_inner or 4 * config.n_embd
    if ranks < 1:
        raise ValueError(f"tensor parallelism needs at least 1 rank, got {ranks}")
    if ranks > config.n_head:
        raise ValueError(f"{ranks} ranks but {model_name} has only {config.n_head} attention heads: every rank needs "
                         f"at least one whole head; use {counts} ranks")
    if config.n_head % ranks or inner % ranks:
        raise ValueError(f"{model_name}'s {config.n_head} attention heads cannot be split {ranks} ways: every rank "
                         f"must hold the same number of whole heads; use {counts} ranks (devices)")


def rank_parameter_bytes(config, ranks: int, rank: int, dtype: torch.dtype) -> dict[str, int]:
    """Bytes of one rank's parameters: embedding (replicated), blocks (cut) and head (cut by vocabulary) (notebook
    07)."""
    parts = {"embedding": 0, "blocks": 0, "head": 0}
    for name, p in meta_model(config).named_parameters():
        part = "embedding" if ".wte." in name else "blocks" if ".h." in name else "head"
        parts[part] += shard_of(torch.empty(p.shape, device="meta"), name, rank, ranks).numel() * dtype.itemsize
    return parts


def plan_tensor_parallel(model_or_config, devices: str | list[Device], dtype: torch.dtype | str | None = None,
                         prompt_tokens: int = 0, max_new_tokens: int = 0, batch_size: int = 1, reserve: int = 0,
                         model_name: str | None = None) -> Plan:
    """Each device's bytes when every block is cut over all of them: its share of the weights, the whole embedding
    (replicated), its vocabulary slice of the head and the KV cache of its heads; refuses what cannot split or fit
    (notebook 07)."""
    config = as_config(model_or_config)
    devices = parse_devices(devices) if isinstance(devices, str) else list(devices)
    name = model_name or (str(model_or_config) if isinstance(model_or_config, str) else "the model")
    check_head_split(config, len(devices), name)
    dtype = as_dtype(dtype) or default_dtype(config, devices)
    n = len(devices)
    kv = kv_cache_bytes_per_layer(config, dtype, prompt_tokens + max_new_tokens, batch_size) * config.n_layer // n
    stages = []
    for r, d in enumerate(devices):
        parts = rank_parameter_bytes(config, n, r, dtype)
        params = sum(parts.values())
        stages.append(StagePlan(d.name, True, (0, config.n_layer), True, params, kv, reserve, params + kv + reserve,
                                d.budget_bytes))
    parts = rank_parameter_bytes(config, n, 0, dtype)
    plan = Plan(name, dtype_name(dtype), sum(p.numel() for p in meta_model(config).parameters()), stages,
                {"embedding": parts["embedding"], "block": parts["blocks"] // config.n_layer, "head": parts["head"]})
    over = [(r, s) for r, s in enumerate(stages) if s.total_bytes > s.budget_bytes]
    if over:
        r, s = over[0]
        raise MemoryError(f"{name} does not fit in tensor parallel over {n} device(s): device {r} ({s.device}) needs "
                          f"{format_size(s.total_bytes)} (weights {format_size(s.param_bytes)} with the whole "
                          f"embedding, KV cache {format_size(s.kv_cache_bytes)}) but has {format_size(s.budget_bytes)}"
                          f": use more devices ({', '.join(map(str, rank_counts(config)))} ranks split the heads), a "
                          "smaller dtype, or a shorter context.")
    return plan


@dataclass
class RankModel:
    """What one tensor-parallel process holds: transformers' GPTJForCausalLM with this rank's shards (notebook 07)."""

    rank: int
    ranks: int
    variant: str
    device: torch.device
    dtype: torch.dtype
    model: torch.nn.Module
    param_bytes: int
    eos_token_id: int
    clock: EventClock  # the collectives' timings, restarted for every job
    comm: torch.device  # where collectives run: the GPU for NCCL, the CPU for gloo

    @property
    def config(self):
        """The whole model's config (heads are cut in the weights, never in the config)."""
        return self.model.config


def tensor_parallel_plan(lm_head: bool = True) -> dict:
    """torch's layouts for one GPT-J block (and the head): column-wise q/k/v/fc_in, row-wise out_proj/fc_out (notebook
    07)."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    layouts = {f"transformer.h.*.{name}": ColwiseParallel() for name in ("attn.q_proj", "attn.k_proj", "attn.v_proj",
                                                                           "mlp.fc_in")}
    layouts |= {f"transformer.h.*.{name}": RowwiseParallel() for name in ("attn.out_proj", "mlp.fc_out")}
    if lm_head:
        layouts["lm_head"] = ColwiseParallel(output_layouts=Replicate())  # logits gathered over the vocabulary
    return layouts


class CollectiveStart(ModuleHook):
    """Observes, added ahead of torch's layout hook on a module (RowwiseParallel's all-reduce, the head's
    all-gather): a stamp on the run's clock as the collective starts (notebook 07)."""

    def __init__(self, rank_model: RankModel, marks: list):
        self.rank_model, self.marks = rank_model, marks

    def post_forward(self, module, args, kwargs, output):
        self.marks.append(self.rank_model.clock.stamp(self.rank_model.comm))
        return output


class CollectiveEnd(CollectiveStart):
    """Observes, added after the layout hook: the collective's interval noted once its result is ready. Funcol
    results are lazy: it waits for them inside the timing, which changes no value (notebook 07)."""

    def __init__(self, rank_model: RankModel, marks: list, kind: str):
        super().__init__(rank_model, marks)
        self.kind = kind

    def post_forward(self, module, args, kwargs, output):
        output = output.wait() if hasattr(output, "wait") else output
        rm = self.rank_model
        rm.clock.note(rm.rank, self.marks.pop(), rm.comm, self.kind)
        return output


def time_collective(module: torch.nn.Module, rank_model: RankModel, kind: str) -> None:
    """Time the collective that torch's layout hook runs after `module` (notebook 07)."""
    marks: list = []
    add_hook(module, CollectiveStart(rank_model, marks), prepend=True)
    add_hook(module, CollectiveEnd(rank_model, marks, kind))


class HoldPartialSum(ModuleHook):
    """It does more than observe: attention's partial sum is held back for the MLP's hook, and the block gets a zero in
    its place (notebook 07)."""

    def __init__(self, held: list):
        self.held = held

    def post_forward(self, module, args, kwargs, output):
        self.held.append(output[0])
        return (torch.zeros_like(output[0]), *output[1:])


class AllReduceBlock(ModuleHook):
    """It does more than observe: the MLP's partial sum plus attention's held one, added over every rank by one
    all-reduce, timed on the run's clock; the block then adds 0 + that sum + the residual (notebook 07)."""

    def __init__(self, held: list, rank_model: RankModel):
        self.held, self.rank_model = held, rank_model

    def post_forward(self, module, args, kwargs, output):
        import torch.distributed as dist

        rm = self.rank_model
        total = (self.held.pop() + output).to(rm.comm)
        start = rm.clock.stamp(rm.comm)
        dist.all_reduce(total)
        rm.clock.note(rm.rank, start, rm.comm, "all-reduce")
        return total.to(output.device)


def one_reduce_per_block(block: torch.nn.Module, rank_model: RankModel) -> None:
    """The hand-written variant: attention's partial sum waits for the MLP's, and one all-reduce adds both (notebook
    07). Both hooks change what the block computes: that is the variant."""
    held: list[torch.Tensor] = []
    add_hook(block.attn, HoldPartialSum(held))
    add_hook(block.mlp, AllReduceBlock(held, rank_model))


class GatherVocabulary(ModuleHook):
    """It does more than observe: each rank's logits for its vocabulary slice, all-gathered (padded to equal pieces)
    into the whole vocabulary's, timed on the run's clock (notebook 07)."""

    def __init__(self, rank_model: RankModel, vocab: int):
        self.rank_model, self.vocab = rank_model, vocab

    def post_forward(self, module, args, kwargs, output):
        import torch.distributed as dist

        rm, ranks = self.rank_model, self.rank_model.ranks
        piece = -(-self.vocab // ranks)  # torch.chunk's piece size; the last pieces may be shorter
        padded = torch.nn.functional.pad(output, (0, piece - output.shape[-1])).to(rm.comm)
        parts = [torch.empty_like(padded) for _ in range(ranks)]
        start = rm.clock.stamp(rm.comm)
        dist.all_gather(parts, padded.contiguous())
        rm.clock.note(rm.rank, start, rm.comm, "all-gather")
        sizes = [len(c) for c in torch.empty(self.vocab, device="meta").chunk(ranks)]
        return torch.cat([p[..., :s] for p, s in zip(parts, sizes)], dim=-1).to(output.device)


def gather_vocabulary(lm_head: torch.nn.Module, rank_model: RankModel, vocab: int) -> None:
    """The hand-written head: each rank's vocabulary slice of the logits, gathered (notebook 07)."""
    add_hook(lm_head, GatherVocabulary(rank_model, vocab))


def cut_linear(linear: torch.nn.Linear, dim: int, rank: int, ranks: int) -> torch.nn.Linear:
    """A meta Linear holding only this rank's rows (dim 0) or columns (dim 1) of `linear` (notebook 07)."""
    out_f, in_f = linear.weight.shape
    if dim == 0:
        out_f = len(torch.empty(out_f, device="meta").chunk(ranks)[rank])
    else:
        in_f = len(torch.empty(in_f, device="meta").chunk(ranks)[rank])
    return torch.nn.Linear(in_f, out_f, bias=linear.bias is not None, device="meta", dtype=linear.weight.dtype)


def build_rank_model(model_path, rank: int, ranks: int, dtype: torch.dtype, device: str = "cpu",
                     variant: str = "block", mesh=None, comm_device: str = "cpu") -> RankModel:
    """Build GPT-J on the meta device, cut it for this rank, allocate only the shards (`to_empty`), fill them from
    safetensors or seeds, and put back the rotary tables that `to_empty` leaves as garbage (notebook 07)."""
    from accelerate import init_empty_weights
    GPTJForCausalLM = gptj_modeling().GPTJForCausalLM

    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: use one of {VARIANTS}")
    weights = WeightReader(model_path)
    config = weights.config
    with init_empty_weights():  # parameters on meta; buffers (the rotary sin/cos table) computed for real
        model = GPTJForCausalLM(config)
    shapes = {name: p.shape for name, p in model.named_parameters()}
    weights.check(shapes)
    buffers = {name: b.clone() for name, b in model.named_buffers()}  # non-persistent: in no file
    model.to(dtype)  # on meta: free, so the shards are allocated in their own dtype
    if ranks > 1 and variant == "torch":
        from torch.distributed.tensor.parallel import parallelize_module

        parallelize_module(model, mesh, tensor_parallel_plan())
    elif ranks > 1:
        for name, module in list(model.named_modules()):
            if isinstance(module, torch.nn.Linear) and shard_dim(name + ".weight") is not None:
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, cut_linear(module, shard_dim(name + ".weight"), rank,
                                                                       ranks))
    for block in model.transformer.h:  # 5.17 reshapes with this count (5.24 with -1); head_dim stays the model's
        block.attn.num_attention_heads = config.n_head // ranks
    model.to_empty(device=device)
    for name, value in buffers.items():  # as computed, in float32, as placement keeps them
        parent, _, child = name.rpartition(".")
        model.get_submodule(parent)._buffers[child] = value.to(device)
    with torch.no_grad():
        for name, param in model.named_parameters():  # one whole tensor in memory at a time
            local = param.to_local() if hasattr(param, "to_local") else param
            whole = weights.read(name, shapes[name], dtype, torch.device("cpu"))
            local.copy_(shard_of(whole, name, rank, ranks))
            if variant == "block" and rank > 0 and name.endswith("mlp.fc_out.bias"):
                local.zero_()  # the bias is added once, by rank 0, before the all-reduce sums the ranks
            del whole
    params = sum(tensor_bytes(p.to_local() if hasattr(p, "to_local") else p) for p in model.parameters())
    rank_model = RankModel(rank, ranks, variant, torch.device(device), dtype, model.eval(), params,
                           eos_token_id(config), EventClock(), torch.device(comm_device))
    if ranks > 1 and variant == "block":
        for block in model.transformer.h:
            one_reduce_per_block(block, rank_model)
        gather_vocabulary(model.lm_head, rank_model, config.vocab_size)
    elif ranks > 1:
        for block in model.transformer.h:
            time_collective(block.attn.out_proj, rank_model, "all-reduce")
            time_collective(block.mlp.fc_out, rank_model, "all-reduce")
        time_collective(model.lm_head, rank_model, "all-gather")
    return rank_model


def forward_rank(rank_model: RankModel, x: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
    """One step of transformers' GPT-J forward on this rank's shards: the last position's float32 logits, the same on
    every rank (notebook 07)."""
    from .stage import cache_keyword

    positions = position_ids(mask, x.shape[1])
    model = rank_model.model
    hidden = model.transformer(input_ids=x, attention_mask=mask, position_ids=positions, use_cache=True,
                               **{cache_keyword(): cache}).last_hidden_state
    return model.lm_head(hidden[:, -1:, :])[:, -1].to(copy=True, dtype=torch.float32)
