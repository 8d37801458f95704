"""Notebook 10, part 2: several people at once, one step at a time. Requests wait in a queue; each step first runs one
token for every running sequence, in one forward over the slot cache (slots.py), then fills what is left of a token
budget with chunks of waiting prompts' prefill (the order transformers' continuous batching and the HF post
"Continuous batching from first principles" describe), so a long prompt does not stall the others. A sequence that
ends (its max_tokens, a stop string, the end-of-text token) or whose client left frees its slot in that step, and the
next waiting request takes it. Each request samples with its own settings and generator, so it gets what it would get
alone.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .sampling import Sampling
from .slots import SlotCache, forward_slots

DEFAULT_BUDGET = 256  # tokens one step may run: the running sequences' one each, then prefill chunks
DEFAULT_QUEUE = 64  # requests that may wait for a slot; past it, a new one is refused at once


class QueueFull(RuntimeError):
    """More requests are waiting than the queue holds: the caller should try again later (HTTP 429)."""


@dataclass
class Completion:
    """How a request ended: `reason` "stop" (end-of-text or a stop string), "length" (max_tokens), "cancelled" (its
    client left) or "error"; the whole text, and the token counts OpenAI's `usage` reports (notebook 10)."""

    reason: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    tokens: list[int] = field(default_factory=list)  # the new token ids, the end-of-text one included


@dataclass
class Request:
    """One prompt to continue (notebook 10): its token ids, `max_tokens`, its own `sampling` (a seed makes it
    reproducible) and `stop` strings; `on_text(piece)` gets each new piece of text as soon as it is certain (pieces
    join to exactly the final text), `on_end(completion)` once, when it ends."""

    ids: list[int]
    max_tokens: int
    sampling: Sampling = field(default_factory=lambda: Sampling(greedy=True))
    stop: tuple[str, ...] = ()
    on_text: Callable[[str], None] | None = None
    on_end: Callable[[Completion], None] | None = None
    id: str = ""
    cancelled: bool = False
    submitted: float = field(default_factory=time.time)


@dataclass
class Running:
    """A request in its slot: how much of its prompt is in the cache, the tokens it has, its generator and warpers,
    and the text already handed on."""

    request: Request
    slot: int
    filled: int = 0
    tokens: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    warpers: object = None
    sent: str = ""

    @property
    def decoding(self) -> bool:
        """Whether its prompt is in the cache and it has its first token (it runs one token a step)."""
        return bool(self.tokens)


class Scheduler:
    """Continuous batching over a model, whole or split by the naive split, and its slot cache (notebook 10).

    `submit` queues a request (refusing at once one that can never fit, and any past the queue's limit); `step` runs
    one step; `serve(stop)` steps until `stop` is set, sleeping while there is nothing to do. Thread-safe: requests
    arrive from any thread (the server's), steps run in one."""

    def __init__(self, model, tokenizer, slots: int, max_len: int, budget: int = DEFAULT_BUDGET,
                 queue_limit: int = DEFAULT_QUEUE):
        if budget < slots:
            raise ValueError(f"budget={budget} tokens a step: give at least one per slot ({slots})")
        self.model, self.tokenizer, self.max_len, self.budget = model, tokenizer, max_len, budget
        self.cache = SlotCache(slots, max_len)
        self.free = list(range(slots))
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: dict[int, Running] = {}
        self.queue_limit = queue_limit
        self.lock = threading.Condition()
        self.eos = tokenizer.eos_token_id
        self.ids = itertools.count()
        self.steps = 0

    def check(self, request: Request) -> None:
        """Refuse, with the numbers, a request that can never fit: a slot holds max_len tokens, prompt and answer."""
        need = len(request.ids) + request.max_tokens
        if not request.ids:
            raise ValueError("the prompt is empty: it needs at least one token")
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens={request.max_tokens}: ask for at least 1 token")
        if need > self.max_len:
            raise ValueError(f"the prompt has {len(request.ids)} tokens and max_tokens is {request.max_tokens}: "
                             f"{need} in all, more than a slot's {self.max_len}; ask for at most "
                             f"{max(0, self.max_len - len(request.ids))} tokens or shorten the prompt")

    def submit(self, request: Request) -> Request:
        """Queue a request; it starts at the next step with a free slot (notebook 10)."""
        self.check(request)
        with self.lock:
            if len(self.waiting) >= self.queue_limit:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting (the queue holds "
                                f"{self.queue_limit}): try again shortly")
            request.id = request.id or f"cmpl-{next(self.ids)}"
            self.waiting.append(request)
            self.lock.notify_all()
        return request

    def cancel(self, request: Request) -> None:
        """Its client left: it ends at the next step, and its slot is freed there."""
        request.cancelled = True
        with self.lock:
            self.lock.notify_all()

    def counts(self) -> dict[str, int]:
        """How many requests run and wait now (the server's /health)."""
        with self.lock:
            return {"running": len(self.running), "waiting": len(self.waiting), "slots": self.cache.slots}

    def step(self) -> bool:
        """One step: drop what was cancelled, give free slots to waiting requests, one token for every decoding
        sequence in one forward, then prefill chunks within what is left of the budget. Whether anything ran."""
        with self.lock:
            self.drop_cancelled()
            while self.free and self.waiting:
                request = self.waiting.popleft()
                slot = self.free.pop(0)
                self.running[slot] = self.start(request, slot)
            running = list(self.running.values())
        if not running:
            return False
        decoding = [r for r in running if r.decoding]
        if decoding:
            self.decode(decoding)
        left = self.budget - len(decoding)
        for r in running:
            if left <= 0:
                break
            if not r.decoding and r.slot in self.running:
                left -= self.prefill(r, left)
        self.steps += 1
        return True

    def start(self, request: Request, slot: int) -> Running:
        """A request in its slot, with its own generator seeded as `generate_text(seed=...)` seeds torch's."""
        seed = request.sampling.seed
        generator = None
        if not request.sampling.greedy:
            generator = torch.Generator(device=self.model.transformer.wte.weight.device)  # where the logits land
            generator.manual_seed(seed if seed is not None else int(torch.randint(2**62, ())))
        return Running(request, slot, generator=generator, warpers=request.sampling.warpers())

    def decode(self, decoding: list[Running]) -> None:
        """One token for each decoding sequence, all in one forward."""
        rows = torch.tensor([r.slot for r in decoding])
        starts = torch.tensor([len(r.request.ids) + len(r.tokens) - 1 for r in decoding])
        ids = torch.tensor([[r.tokens[-1]] for r in decoding])
        logits = forward_slots(self.model, self.cache, rows, starts, ids)
        for i, r in enumerate(decoding):
            self.take(r, logits[i:i + 1])

    def prefill(self, r: Running, budget: int) -> int:
        """The next chunk of one prompt, at most `budget` tokens; its first token once the whole prompt is in.
        Returns the tokens it ran."""
        chunk = r.request.ids[r.filled:r.filled + budget]
        logits = forward_slots(self.model, self.cache, torch.tensor([r.slot]), torch.tensor([r.filled]),
                               torch.tensor([chunk]))
        r.filled += len(chunk)
        if r.filled == len(r.request.ids):
            self.take(r, logits)
        return len(chunk)

    def take(self, r: Running, logits: torch.Tensor) -> None:
        """Pick the sequence's next token as `generate` picks it, hand on the text that is certain, and end it where
        it ends."""
        token = int(r.request.sampling.pick(logits, r.warpers, r.generator)[0])
        r.tokens.append(token)
        reason = None
        if token == self.eos:
            reason = "stop"
        text = self.tokenizer.decode(r.tokens, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in r.request.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        elif reason is None and len(r.tokens) >= r.request.max_tokens:
            reason = "length"
        if reason is None:
            self.send(r, certain_text(text, r.request.stop))
        else:
            self.send(r, text)
            self.finish(r, Completion(reason, text, len(r.request.ids), len(r.tokens), tokens=list(r.tokens)))

    def send(self, r: Running, text: str) -> None:
        """Hand on what `text` adds to what was sent."""
        if len(text) > len(r.sent) and text.startswith(r.sent):
            piece, r.sent = text[len(r.sent):], text
            if r.request.on_text is not None:
                r.request.on_text(piece)

    def finish(self, r: Running, completion: Completion) -> None:
        """The sequence ends: its slot is free for the next waiting request, in this same step's admissions."""
        with self.lock:
            self.running.pop(r.slot, None)
            self.free.append(r.slot)
            self.free.sort()
        if r.request.on_end is not None:
            r.request.on_end(completion)

    def drop_cancelled(self) -> None:
        """End what its client left (the lock is held)."""
        for r in [r for r in self.running.values() if r.request.cancelled]:
            self.running.pop(r.slot)
            self.free.append(r.slot)
            if r.request.on_end is not None:
                r.request.on_end(Completion("cancelled", r.sent, len(r.request.ids), len(r.tokens),
                                            tokens=list(r.tokens)))
        self.free.sort()
        for request in [q for q in self.waiting if q.cancelled]:
            self.waiting.remove(request)

    def fail_all(self, error: str) -> None:
        """End every open request with `error` (a rank died, the server stops)."""
        with self.lock:
            ended = [r.request for r in self.running.values()] + list(self.waiting)
            self.running.clear()
            self.waiting.clear()
            self.free = list(range(self.cache.slots))
        for request in ended:
            if request.on_end is not None:
                request.on_end(Completion("error", "", len(request.ids), 0, error))

    def serve(self, stop: threading.Event) -> None:
        """Step until `stop` is set; while nothing runs or waits, sleep until a request arrives (notebook 10)."""
        while not stop.is_set():
            if not self.step():
                with self.lock:
                    if not self.waiting and not self.running:
                        self.lock.wait(timeout=0.1)


def certain_text(text: str, stop: tuple[str, ...]) -> str:
    """The part of a sequence's text that no later token can change: not a trailing incomplete character (the
    tokenizer shows it as U+FFFD), nor a tail that could still grow into a stop string (notebook 10)."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    for s in stop:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[:end].endswith(s[:k]):
                end -= k
                break
    return text[:end]


def run_requests(scheduler: Scheduler, requests: list[Request]) -> list[Completion]:
    """Submit every request, step until all have ended, and return their completions in order (tests, notebook
    10's in-process run)."""
    done: dict[int, Completion] = {}
    for i, request in enumerate(requests):
        previous = request.on_end
        request.on_end = (lambda c, i=i, previous=previous: (done.__setitem__(i, c), previous and previous(c)))
        scheduler.submit(request)
    while len(done) < len(requests):
        scheduler.step()
    return [done[i] for i in range(len(requests))]
