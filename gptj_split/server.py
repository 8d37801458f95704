"""Notebook 10, part 3: an OpenAI-compatible server on FastAPI and uvicorn (the stack `transformers serve` uses), so
the official `openai` client works against it unchanged. `POST /v1/completions` (streamed as server-sent events
ending in `data: [DONE]`, or whole), `GET /v1/models`, `GET /health`; no chat endpoint (GPT-J has no chat
template). Requests go to the continuous-batching scheduler (scheduler.py), which runs in a thread of its own.
"""

import asyncio  # no `from __future__ import annotations`: FastAPI reads the handlers' annotations as classes
import json
import threading
import time

from .sampling import Sampling
from .scheduler import Completion, QueueFull, Request, Scheduler

MAX_BODY = 1 << 20  # bytes of a request body; past it, 413
MAX_STOP = 4  # stop strings per request, as OpenAI allows
DEFAULTS = {"max_tokens": 16, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "stop": None, "seed": None,
            "stream": False}  # OpenAI's defaults (top_k, this series' extra field: 0, no top-k filter)
UNSUPPORTED = {"n": 1, "logprobs": None, "echo": False, "best_of": 1, "suffix": None, "presence_penalty": 0,
               "frequency_penalty": 0, "logit_bias": None}  # refused unless left at these values
ACCEPTED = {"model", "prompt", "user", "stream_options", *DEFAULTS, *UNSUPPORTED}


class ApiError(Exception):
    """An error in OpenAI's shape: HTTP `status`, a message naming what is wrong, its `param` and `type`."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        """OpenAI's error object."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


def read_completion(body: dict, model_name: str, tokenizer) -> tuple[Request, bool]:
    """A completions request checked field by field: the scheduler's Request and whether to stream; an ApiError
    (400) names the first field that is wrong (notebook 10)."""
    unknown = sorted(set(body) - ACCEPTED)
    if unknown:
        raise ApiError(400, f"unsupported field {unknown[0]!r}: this server takes {', '.join(sorted(ACCEPTED))}",
                       unknown[0])
    for name, allowed in UNSUPPORTED.items():
        if name in body and body[name] not in (allowed, None):
            raise ApiError(400, f"{name}={body[name]!r} is not supported here (leave it out, or {allowed!r})", name)
    if body.get("model") not in (model_name, None):
        raise ApiError(404, f"model {body.get('model')!r} is not served here: GET /v1/models lists {model_name!r}",
                       "model", "not_found_error")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "prompt: give one non-empty string", "prompt")
    values = {**DEFAULTS, **{k: v for k, v in body.items() if k in DEFAULTS and v is not None}}
    max_tokens, temperature, top_p, top_k = (values[k] for k in ("max_tokens", "temperature", "top_p", "top_k"))
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise ApiError(400, f"max_tokens={max_tokens!r}: give a whole number of at least 1", "max_tokens")
    if not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
        raise ApiError(400, f"temperature={temperature!r}: give a number from 0 (greedy) to 2", "temperature")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ApiError(400, f"top_p={top_p!r}: give a number in (0, 1]", "top_p")
    if not isinstance(top_k, int) or top_k < 0:
        raise ApiError(400, f"top_k={top_k!r}: give 0 (no top-k filter) or a positive count", "top_k")
    stop = values["stop"]
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, f"stop: give at most {MAX_STOP} non-empty strings", "stop")
    seed = values["seed"]
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ApiError(400, f"seed={seed!r}: give a whole number", "seed")
    if not isinstance(values["stream"], bool):
        raise ApiError(400, "stream: give true or false", "stream")
    sampling = Sampling(greedy=True) if temperature == 0 else Sampling(temperature=float(temperature),
                                                                      top_p=float(top_p), top_k=top_k, seed=seed)
    return Request(tokenizer(prompt)["input_ids"], max_tokens, sampling, tuple(stop)), values["stream"]


def completion_body(request: Request, model_name: str, completion: Completion, created: int) -> dict:
    """The whole answer in OpenAI's shape, with `usage`."""
    return {"id": request.id, "object": "text_completion", "created": created, "model": model_name,
            "choices": [{"text": completion.text, "index": 0, "logprobs": None,
                         "finish_reason": completion.reason}],
            "usage": usage(completion)}


def usage(completion: Completion) -> dict:
    """OpenAI's token counts."""
    return {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
            "total_tokens": completion.prompt_tokens + completion.completion_tokens}


def chunk(request: Request, model_name: str, created: int, text: str, reason: str | None,
          completion: Completion | None = None) -> str:
    """One server-sent event of a streamed answer."""
    body = {"id": request.id, "object": "text_completion", "created": created, "model": model_name,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": reason}]}
    if completion is not None:
        body["usage"] = usage(completion)
    return f"data: {json.dumps(body)}\n\n"


def build_app(scheduler: Scheduler, model_name: str, api_key: str | None = None, health=None):
    """The FastAPI app over a running scheduler; `health()` says "ok" or why the model cannot answer (a rank died)
    (notebook 10)."""
    from fastapi import FastAPI, Request as HttpRequest
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title=f"gptj-helpers: {model_name}")
    health = health or (lambda: "ok")

    def error(err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    def authorised(http: HttpRequest) -> bool:
        return api_key is None or http.headers.get("authorization", "") == f"Bearer {api_key}"

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        if not authorised(http):
            return error(ApiError(401, "a wrong or missing API key: send Authorization: Bearer <key>", None,
                                  "authentication_error"))
        raw = await http.body()
        if len(raw) > MAX_BODY:
            return error(ApiError(413, f"the request body has {len(raw)} bytes, more than {MAX_BODY}"))
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("not an object")
            request, stream = read_completion(body, model_name, scheduler.tokenizer)
            if health() != "ok":
                raise ApiError(503, f"the model cannot answer: {health()}", None, "server_error")
        except ApiError as err:
            return error(err)
        except ValueError as err:
            return error(ApiError(400, f"the body is not a JSON object: {err}"))
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        request.on_text = lambda piece: loop.call_soon_threadsafe(events.put_nowait, ("text", piece))
        request.on_end = lambda done: loop.call_soon_threadsafe(events.put_nowait, ("end", done))
        try:
            scheduler.submit(request)
        except QueueFull as err:
            return error(ApiError(429, str(err), None, "rate_limit_error"))
        except ValueError as err:
            return error(ApiError(400, str(err), "max_tokens"))
        created = int(time.time())
        if not stream:
            try:
                while True:
                    kind, value = await events.get()
                    if kind == "end":
                        break
            except asyncio.CancelledError:
                scheduler.cancel(request)
                raise
            if value.reason == "error":
                return error(ApiError(503, f"the model failed: {value.error}", None, "server_error"))
            return completion_body(request, model_name, value, created)

        async def stream_events():
            try:
                while True:
                    kind, value = await events.get()
                    if kind == "text":
                        yield chunk(request, model_name, created, value, None)
                    elif value.reason == "error":
                        body = ApiError(503, f"the model failed: {value.error}", None, "server_error").body()
                        yield f"data: {json.dumps(body)}\n\n"
                        return
                    else:
                        yield chunk(request, model_name, created, "", value.reason, value)
                        yield "data: [DONE]\n\n"
                        return
            finally:  # the client left (or the stream ended): a request still running is dropped at the next step
                scheduler.cancel(request)

        return StreamingResponse(stream_events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat():
        return error(ApiError(404, "GPT-J has no chat template, so there is no chat endpoint: send a prompt to "
                                   "/v1/completions", None, "not_found_error"))

    @app.get("/v1/models")
    async def models(http: HttpRequest):
        if not authorised(http):
            return error(ApiError(401, "a wrong or missing API key: send Authorization: Bearer <key>", None,
                                  "authentication_error"))
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "gptj-helpers"}]}

    @app.get("/health")
    async def healthcheck():
        state = health()
        body = {"state": state, **scheduler.counts()}
        return JSONResponse(body, status_code=200 if state == "ok" else 503)

    return app


def serve_model(model, tokenizer, model_name: str, slots: int, max_len: int, host: str = "127.0.0.1",
                port: int = 8000, api_key: str | None = None, budget: int | None = None) -> None:
    """Serve a placed model until Ctrl-C or SIGTERM: the scheduler's thread steps the model; when uvicorn is asked to
    stop, every open request ends at once with an error event (its stream closes cleanly), then uvicorn's graceful
    shutdown finishes and, as uvicorn does, the process ends by the signal it got; no thread or process is left
    (notebook 10; `python -m gptj_helpers serve`)."""
    import uvicorn

    scheduler = Scheduler(model, tokenizer, slots, max_len, **({"budget": budget} if budget else {}))
    stop = threading.Event()
    server = uvicorn.Server(uvicorn.Config(build_app(scheduler, model_name, api_key), host=host, port=port,
                                           log_level="warning", timeout_graceful_shutdown=5))

    def end_on_shutdown():
        while not stop.wait(0.01):
            if server.should_exit:  # set by uvicorn's signal handler
                stop.set()
                scheduler.fail_all("the server is stopping")

    threads = [threading.Thread(target=scheduler.serve, args=(stop,), name="scheduler", daemon=True),
               threading.Thread(target=end_on_shutdown, name="shutdown", daemon=True)]
    for thread in threads:
        thread.start()
    try:
        server.run()
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
        scheduler.fail_all("the server stopped")
