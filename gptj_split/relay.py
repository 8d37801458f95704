"""Notebooks 05 to 07: starting processes from a notebook, and streaming across them. CPU stage processes fork
from a server that has imported torch and transformers once. The process that picks tokens puts each step's tokens on
a queue; a thread in the caller's process hands them to a transformers streamer and runs the caller's stopping
criteria, and a Stop travels back as a shared flag that the picking process reads once per step.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from dataclasses import dataclass

import torch


# what every stage or rank process imports: the fork server imports it once, before it forks any of them
STAGE_IMPORTS = ["__main__", "gptj_split.preload"]


def process_context(devices: list[str], model=None):
    """How notebooks 05 to 07 start the processes of stages on `devices`. On Linux, CPU stages fork from a server,
    started at the first run, that imports STAGE_IMPORTS once, so each starts within a fraction of a second instead
    of spending seconds of CPU importing torch and transformers again (forkserver: Python 3.14's default on Linux).
    GPU stages are spawned: CUDA cannot start in a process forked from one that may have touched it, and loading
    their weights takes far longer than the imports. So are GPT-J-6B's full-size stages (`model`): forked, they raised
    notebook 07's rehearsal peak from 14.73 to 16.87 GiB, and at that size the imports are a small part of the
    start. Elsewhere too (macOS's system libraries are not fork-safe, Windows has no fork). The server lives as long
    as this process (`adopt_environment`)."""
    import sys

    from .hub import load_config
    from .models import is_gptj_6b

    if not sys.platform.startswith("linux") or any(torch.device(d).type != "cpu" for d in devices) or (
            model is not None and is_gptj_6b(load_config(str(model)))):
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(STAGE_IMPORTS)  # takes effect when the server starts; a running one keeps its own
    return ctx


def adopt_environment(environ: dict[str, str] | None) -> None:
    """In a stage process: take the caller's environment as it was when the stage started, as a spawned process
    would (a forked one has its fork server's, from the first run); `tempfile` then reads TMPDIR again."""
    import tempfile

    if environ is not None:
        os.environ.clear()
        os.environ.update(environ)
        tempfile.tempdir = None


@dataclass
class RelayEnd:
    """The worker's end of a TokenRelay: picklable, handed to the process that picks tokens (notebooks 05–07)."""

    queue: object  # multiprocessing Queue: a list of token ids (one per row) per step, then None
    stop: object  # multiprocessing Event: set by the caller's process to end generation after the current token

    def put(self, token_ids: torch.Tensor) -> None:
        """Send one step's new tokens, one per row, to the caller."""
        # plain ints: a tensor on a queue would be moved into shared memory, under a send still reading it
        self.queue.put(token_ids.detach().reshape(-1).tolist())

    def stop_requested(self) -> bool:
        """Whether the caller asked generation to stop (read once per step)."""
        return self.stop.is_set()

    def end(self) -> None:
        """No more tokens will come; waits until the queue has handed everything over (the process may exit at once)."""
        self.queue.put(None)
        self.queue.close()
        self.queue.join_thread()


class TokenRelay:
    """Feeds a transformers streamer and stopping criteria in this process from tokens picked in another
    (notebooks 05–07).

    Create it before starting the processes, give `worker_end()` to the process that picks tokens, and run the
    generation inside `with relay:`. A stopping criterion that returns True for every row sets the stop flag;
    the worker then ends after the token it is computing, as `generate` does.
    """

    def __init__(self, ctx, prompt_ids: torch.Tensor, stream=None, stopping_criteria=None):
        self.queue, self.stop = ctx.Queue(), ctx.Event()
        self.ids, self.stream, self.criteria = prompt_ids.detach().cpu(), stream, list(stopping_criteria or [])
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def worker_end(self) -> RelayEnd:
        """The picklable end for the worker that picks tokens."""
        return RelayEnd(self.queue, self.stop)

    def feed(self) -> None:
        """The relay thread: each step's tokens go to the streamer, then the stopping criteria decide."""
        try:
            while (picked := self.queue.get()) is not None:
                tokens = torch.tensor(picked, dtype=torch.long).view(-1, 1)
                self.ids = torch.cat([self.ids, tokens], dim=1)
                if self.stream is not None:
                    self.stream.put(tokens if len(tokens) > 1 else tokens[0])
                if any(bool(torch.as_tensor(c(self.ids, None)).all()) for c in self.criteria):
                    self.stop.set()
        except BaseException as err:  # a failing streamer stops the run; the caller raises it
            self.error = err
            self.stop.set()

    def __enter__(self) -> TokenRelay:
        if self.stream is not None:
            self.stream.put(self.ids if len(self.ids) > 1 else self.ids[0])  # streamers skip the prompt first
        self.thread = threading.Thread(target=self.feed, daemon=True, name="token-relay")
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.queue.put(None)  # ends the thread even when the worker died before its own end()
        self.thread.join(30)
        if self.stream is not None:
            self.stream.end()
        if self.error is not None and exc[0] is None:
            raise self.error
