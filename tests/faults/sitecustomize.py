"""Tests only, never the product: faults injected into rank processes. conftest.py puts this folder first on the
PYTHONPATH of every process the tests start, before any rank runs, so the ranks, forked from the fork server or
spawned, and the ranks torchrun starts all load it. It patches each rank's step where it is defined, right after
that module is imported (before any other module binds the name): `gptj_split.stage.forward_stage` for a pipeline
stage, `gptj_split.shards.forward_rank` for a tensor-parallel rank. With GPTJ_TEST_FAULT="RANK:STEP:MODE" in the
environment a run starts with (ranks take the caller's environment of that moment), that rank raises, exits at once
(code 3) or hangs when it begins token STEP; without it, the step runs as it is.
"""
import functools
import importlib.abc
import importlib.machinery
import os
import sys
import time

VARIABLE = "GPTJ_TEST_FAULT"
STEPS = {"gptj_split.stage": ("forward_stage", "pipeline stage"), "gptj_split.shards": ("forward_rank",
                                                                                         "tensor-parallel rank")}


def faulty(step_function, kind: str):
    """The step function, counting each cache's calls (its token number) and failing where VARIABLE says."""
    calls: dict[int, int] = {}

    @functools.wraps(step_function)
    def step(owner, x, mask, cache, *args, **kwargs):
        spec = os.environ.get(VARIABLE)
        if spec:
            token = calls.get(id(cache), 0)
            calls[id(cache)] = token + 1
            rank, at, mode = spec.split(":")
            if int(rank) == owner.rank and int(at) == token:
                message = f"injected fault: {kind} {owner.rank} stops after {token} token(s)"
                print(f"{message} ({mode})", file=sys.stderr, flush=True)
                if mode == "exit":
                    os._exit(3)
                while mode == "hang":
                    time.sleep(1)
                raise RuntimeError(message)
        return step_function(owner, x, mask, cache, *args, **kwargs)

    return step


class PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds the step modules as Python would, and patches each one's step once it has run."""

    def find_spec(self, name, path, target=None):
        if name not in STEPS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            function, kind = STEPS[name]
            setattr(module, function, faulty(getattr(module, function), kind))

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, PatchOnImport())
