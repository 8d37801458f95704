"""Notebooks 05 to 07: streaming tokens across processes. The process that picks tokens puts each step's tokens on a
queue; a thread in the caller's process hands them to a transformers streamer and runs the caller's stopping
criteria, and a Stop travels back as a shared flag that the picking process reads once per step. Under torchrun,
rank 0 prints them itself (`PrintRelay`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from .generate import make_streamer


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


class PrintRelay:
    """Under torchrun, the rank that picks tokens streams to its own standard output as `generate --stream` prints:
    each job's prompt, then its text as the tokens are picked, a blank line between prompts (notebook 07)."""

    def __init__(self, tokenizer, prompts: list[str]):
        self.tokenizer, self.prompts, self.streamer = tokenizer, list(prompts), None

    def put(self, token_ids: torch.Tensor) -> None:
        """One step's token: the first of a job prints its prompt first (the streamer skips what it is given first)."""
        if self.streamer is None:
            self.streamer = make_streamer(self.tokenizer, [self.prompts.pop(0)], True)
            self.streamer.put(token_ids.view(-1))
        self.streamer.put(token_ids.view(-1))

    def stop_requested(self) -> bool:
        """Nobody asks a torchrun launch to stop."""
        return False

    def end(self) -> None:
        """The job is done: flush its text, and a blank line before the next prompt."""
        if self.streamer is not None:
            self.streamer.end()
            self.streamer = None
            if self.prompts:
                print(flush=True)
