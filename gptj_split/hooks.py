"""Notebooks 02 to 07: the one style in which this series hooks a module, after accelerate's `ModelHook`. A hook is an
object with `pre_forward(module, args, kwargs) -> (args, kwargs)`, run before the module's forward, and
`post_forward(module, args, kwargs, output) -> output`, run after it; `add_hook(module, hook)` attaches the ones the
hook defines with torch's own forward hooks and returns one handle that removes them.

A hook that only observes (a clock's stamps, tensor sizes) returns what it was given. A hook that does more says so
in its docstring and where it is added: moving a stage's inputs across a device boundary (place.py), adding partial
sums across ranks (shards.py). The compiled decode (compiled.py) is the one exception: it swaps the forward itself,
because no Python hook may run inside a compiled region.
"""

from __future__ import annotations

import torch


class ModuleHook:
    """Subclass and override either method; the defaults change nothing (notebooks 02 to 07)."""

    def pre_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Before the module's forward: its positional and keyword inputs, as the forward will get them."""
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict, output):
        """After the module's forward: its output, as the caller will get it."""
        return output


class HookHandle:
    """What `add_hook` returns: `remove()` takes the hook off its module again."""

    def __init__(self, handles: list):
        self.handles = handles

    def remove(self) -> None:
        """Detach every torch hook this handle holds."""
        for handle in self.handles:
            handle.remove()
        self.handles = []


def add_hook(module: torch.nn.Module, hook: ModuleHook, prepend: bool = False) -> HookHandle:
    """Attach `hook` to `module`: torch's forward pre-hook for its `pre_forward` and forward hook for its
    `post_forward` (with keyword inputs), only for the methods it overrides; `prepend`: before the module's other
    hooks (notebooks 02 to 07)."""
    handles = []
    if type(hook).pre_forward is not ModuleHook.pre_forward:
        handles.append(module.register_forward_pre_hook(hook.pre_forward, with_kwargs=True, prepend=prepend))
    if type(hook).post_forward is not ModuleHook.post_forward:
        handles.append(module.register_forward_hook(hook.post_forward, with_kwargs=True, prepend=prepend))
    return HookHandle(handles)
