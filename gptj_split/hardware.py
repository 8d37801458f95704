"""Notebook 00: what one node has (its GPUs: name, total and free memory, compute capability; the host's free memory),
read once from torch on the real machine, or described for a machine that is not here (Colab's T4, Kaggle's two,
a node of a cluster). Every decision that depends on the hardware takes this description, so the CPU can prove it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch

GIB = 2**30
BFLOAT16_CAPABILITY = (8, 0)  # Ampere: the first cards that compute bfloat16 (a T4, 7.5, only emulates it)
INT8_CAPABILITY = (7, 5)  # bitsandbytes' LLM.int8 kernels (a P100 is 6.0)
NF4_CAPABILITY = (5, 0)  # bitsandbytes' 4-bit kernels run from Maxwell on


@dataclass(frozen=True)
class Card:
    """One GPU as torch sees it: its name, total and free bytes, and compute capability (notebook 00)."""

    name: str
    total_bytes: int
    free_bytes: int | None  # None: not read (reading it creates a CUDA context)
    capability: tuple[int, int]

    @property
    def computes_bfloat16(self) -> bool:
        """Whether the card has bfloat16 arithmetic (compute capability 8.0 or more), not only its emulation."""
        return tuple(self.capability) >= BFLOAT16_CAPABILITY

    def formats(self) -> tuple[str, ...]:
        """The weight formats this card runs: float16, bfloat16 where it computes it, int8 and nf4 where
        bitsandbytes' kernels support it (notebooks 00, 08)."""
        cap = tuple(self.capability)
        return tuple(f for f, ok in (("float32", True), ("float16", True), ("bfloat16", self.computes_bfloat16),
                                     ("int8", cap >= INT8_CAPABILITY), ("nf4", cap >= NF4_CAPABILITY)) if ok)


CPU_FORMATS = ("float32", "float16", "bfloat16", "int8", "nf4")  # what this series runs on a CPU

# cards as torch reports them (total_memory), for planning and tests on a machine that does not have them
CARDS = {
    "T4": Card("Tesla T4", 15_835_660_288, 15_720_382_464, (7, 5)),  # 14.75 GiB: Colab's, Kaggle's two
    "P100": Card("Tesla P100-PCIE-16GB", 17_071_734_784, 16_956_456_960, (6, 0)),  # Kaggle's other choice
    "8GB": Card("GeForce RTX 3070", 8_361_279_488, 8_246_001_664, (8, 6)),  # a box of 4 x 8 GB
    "10GB": Card("GeForce RTX 3080", 10_504_699_904, 10_389_422_080, (8, 6)),  # the 2021 post's 10 GB cards
    "4GB": Card("GeForce GTX 1650", 4_100_521_984, 3_985_244_160, (7, 5)),  # a box of 8 x 4 GB
    "A100": Card("NVIDIA A100-SXM4-40GB", 42_298_834_944, 42_183_557_120, (8, 0)),
    "H100": Card("NVIDIA H100 80GB HBM3", 85_045_870_592, 84_930_592_768, (9, 0)),
}


@dataclass(frozen=True)
class Hardware:
    """What one node has: its GPUs in the order this process sees them (after CUDA_VISIBLE_DEVICES), and the host's
    free memory (notebook 00)."""

    cards: tuple[Card, ...] = ()
    host_free_bytes: int = 64 * GIB

    @property
    def gpus(self) -> int:
        """How many GPUs this node shows this process."""
        return len(self.cards)

    def __str__(self) -> str:
        if not self.cards:
            return "no GPU"
        names = [c.name for c in self.cards]
        return ", ".join(f"{names.count(n)} x {n}" for n in dict.fromkeys(names))


def describe_hardware(text: str, host_free: int = 64 * GIB) -> Hardware:
    """A node described, not read: "2 x T4", "4x8GB", "T4", "cpu" (no GPU); cards from CARDS (notebook 00)."""
    if text.strip().lower() in ("cpu", "none", ""):
        return Hardware((), host_free)
    cards: list[Card] = []
    for part in text.split("+"):
        match = re.fullmatch(r"\s*(?:(\d+)\s*[x×]\s*)?(\S+)\s*", part)
        if not match or match.group(2) not in CARDS:
            raise ValueError(f"cannot read the hardware {part.strip()!r}: write COUNT x CARD with a card from "
                             f"{', '.join(CARDS)}, like '2 x T4'")
        cards += [CARDS[match.group(2)]] * int(match.group(1) or 1)
    return Hardware(tuple(cards), host_free)


def read_hardware(free: bool = False) -> Hardware:
    """This node, read once from torch: each visible GPU's name, total memory and capability, and with `free` what
    each has free now (asking creates this process's CUDA context on each GPU) (notebook 00)."""
    import psutil

    cards = []
    for index in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        props = torch.cuda.get_device_properties(index)
        free_bytes = int(torch.cuda.mem_get_info(index)[0]) if free else None
        cards.append(Card(props.name, int(props.total_memory), free_bytes, (props.major, props.minor)))
    return Hardware(tuple(cards), int(psutil.virtual_memory().available))


def with_free(hardware: Hardware, index: int, free_bytes: int) -> Hardware:
    """The same node with one card's free memory changed (a test's busy GPU, a card another process uses)."""
    cards = list(hardware.cards)
    cards[index] = replace(cards[index], free_bytes=free_bytes)
    return replace(hardware, cards=tuple(cards))
