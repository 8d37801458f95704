"""Notebook 10's server: `python -m gptj_helpers serve` in a process of its own, driven by the official `openai`
client as a user would: several streams at once, each what generate_text gives alone; a client that leaves
mid-stream frees its slot; OpenAI's error shapes for what is refused; SIGTERM ends it and leaves no process."""
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest

import gptj_helpers as gh
from conftest import ROOT

KEY = "test-key"
PROMPTS = ["The list", "A dictionary is a mapping of keys to values, and", "import os", "Hello, world",
           "The function returns the"]


def free_port() -> int:
    """A TCP port nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    """The server on the tiny default, 3 slots of 96 tokens, an API key; stopped with SIGTERM at the end."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "gptj_helpers", "serve", "--model", "tiny", "--devices", "cpu",
                             "--slots", "3", "--max-len", "96", "--port", str(port), "--api-key", KEY],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            pytest.fail(f"the server exited: {proc.stderr.read()}")
        time.sleep(0.3)
    yield proc, url
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def client(url: str, key: str = KEY):
    """The official openai client against the server."""
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def alone(prompt: str, new: int) -> str:
    """generate_text's greedy text for one prompt alone, on the same tiny model."""
    model, tokenizer = gh.load_model("tiny"), gh.load_tokenizer("tiny")
    return gh.generate_text(model, tokenizer, prompt, new, greedy=True)[0][0]


@pytest.mark.timeout(180)
def test_several_streams_at_once_each_get_what_generate_text_gives_alone(server):
    _, url = server
    api = client(url)

    def stream(prompt: str) -> tuple[str, list]:
        pieces, last = [], None
        for event in api.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, stream=True):
            pieces.append(event.choices[0].text)
            last = event
        return "".join(pieces), last

    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:  # more prompts than slots: some wait
        results = list(pool.map(stream, PROMPTS))
    for prompt, (text, last) in zip(PROMPTS, results):
        assert text == alone(prompt, 12), prompt
        assert last.choices[0].finish_reason in ("stop", "length") and last.usage.completion_tokens >= 1
    whole = api.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=12, temperature=0)
    assert whole.choices[0].text == results[1][0] and whole.usage.prompt_tokens > 0
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    seeded = [api.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0.9, top_p=0.8,
                                     seed=3).choices[0].text for _ in range(2)]
    model, tokenizer = gh.load_model("tiny"), gh.load_tokenizer("tiny")
    assert seeded[0] == seeded[1] == gh.generate_text(model, tokenizer, PROMPTS[0], 12, temperature=0.9, top_p=0.8,
                                                      seed=3)[0][0]
    assert [m.id for m in api.models.list().data] == ["tiny"]


@pytest.mark.timeout(120)
def test_a_client_that_leaves_mid_stream_frees_its_slot(server):
    _, url = server
    api = client(url)
    stream = api.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=80, temperature=0, stream=True)
    next(iter(stream))
    stream.close()  # the client leaves
    deadline = time.time() + 20
    while time.time() < deadline:
        health = httpx.get(f"{url}/health").json()
        if health["running"] == 0 and health["waiting"] == 0:
            break
        time.sleep(0.2)
    assert health == {"state": "ok", "running": 0, "waiting": 0, "slots": 3}
    text = api.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=8, temperature=0).choices[0].text
    assert text == alone(PROMPTS[2], 8)


@pytest.mark.timeout(120)
def test_what_is_refused_gets_openais_error_shape_naming_the_field(server):
    import openai

    _, url = server
    api = client(url)
    cases = [({"n": 2}, openai.BadRequestError, "n=2 is not supported"),
             ({"logprobs": 2}, openai.BadRequestError, "logprobs=2 is not supported"),
             ({"temperature": 3}, openai.BadRequestError, "temperature=3: give a number from 0"),
             ({"top_p": 0}, openai.BadRequestError, "top_p=0: give a number in (0, 1]"),
             ({"stop": ["a", "b", "c", "d", "e"]}, openai.BadRequestError, "stop: give at most 4"),
             ({"max_tokens": 500}, openai.BadRequestError, "more than a slot's 96"),
             ({"model": "gpt-4"}, openai.NotFoundError, "model 'gpt-4' is not served here")]
    for fields, error, message in cases:
        with pytest.raises(error) as info:
            api.completions.create(**{"model": "tiny", "prompt": "The list", "max_tokens": 4, **fields})
        assert message in info.value.body["message"], (fields, info.value.body)
    with pytest.raises(openai.BadRequestError, match="unsupported field 'frobnicate'"):
        api.completions.create(model="tiny", prompt="The list", max_tokens=4, extra_body={"frobnicate": 1})
    with pytest.raises(openai.NotFoundError, match="GPT-J has no chat template"):
        api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.AuthenticationError):
        client(url, "wrong").completions.create(model="tiny", prompt="The list", max_tokens=4)
    big = httpx.post(f"{url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                     content=json.dumps({"model": "tiny", "prompt": "x" * (2 << 20)}))
    assert big.status_code == 413 and "more than" in big.json()["error"]["message"]
    assert httpx.get(f"{url}/health").json()["state"] == "ok"  # nothing else disturbed


@pytest.mark.timeout(120)
def test_sigterm_ends_open_streams_and_leaves_no_process(server):
    """An open stream gets an error event and ends; the server stops by the signal (uvicorn re-raises it once its
    graceful shutdown is done) well before the stream would have finished, leaving no process."""
    import openai

    proc, url = server
    api = client(url)
    stream = api.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=90, temperature=0, stream=True)
    events = iter(stream)
    next(events)
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGTERM)
    received, ended = 1, None
    try:
        for _ in events:
            received += 1
    except openai.APIError as err:
        ended = err
    assert ended is not None and "the server is stopping" in str(ended) and received < 90
    assert proc.wait(30) in (0, -signal.SIGTERM)
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
