"""Notebook 06: the prompt widget, driven from Python (click handlers), then in a real browser (JupyterLab +
headless Chromium through Playwright)."""
import dataclasses
import html
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

import gptj_helpers as gh
from gptj_split.processes import free_port
from conftest import ROOT

pytestmark = pytest.mark.widget  # make test runs these again on ipywidgets 7.7.1 (Colab's)

CHROMIUM = "/usr/bin/chromium"
# the flags environment-notes.md found necessary for headless Chromium here
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
NOTEBOOK = ROOT / "notebooks" / "06_prompt_widget.ipynb"


@pytest.fixture(scope="module")
def models(tiny, tiny_path):
    """The tiny default whole and split over 3 virtual CPU devices, with its tokenizer."""
    model, tokenizer = tiny
    split = gh.place_stages(tiny_path, gh.plan_split(tiny_path, "3xcpu", dtype=torch.float32))
    return {"whole": model, "split": split}, tokenizer


def set_controls(widget, prompt, **values):
    widget.prompt.value = prompt
    for name, value in values.items():
        getattr(widget, name).value = value


@pytest.mark.parametrize("which", ["whole", "split"])
@pytest.mark.parametrize("knobs", [dict(temperature=0.8, top_p=0.9, top_k=20, seed=3), dict(greedy=True)])
def test_widget_streams_generate_texts_text(models, which, knobs):
    by_name, tokenizer = models
    model = by_name[which]
    widget = gh.prompt_widget(model, tokenizer)
    set_controls(widget, "A function is", max_new_tokens=16, **knobs)
    seen = []  # (text so far, Generate disabled?, Stop disabled?) at every streamed update

    def note(change):
        seen.append((widget.text, widget.generate_button.disabled, widget.stop_button.disabled))

    widget.output.observe(note, "value")
    widget.generate_button.click()
    assert widget.wait(timeout=120)
    assert widget.error is None and widget.message.value == ""
    want, record = gh.generate_text(model, tokenizer, "A function is", max_new_tokens=16, **knobs)
    assert widget.text == want[0] and want[0]
    assert widget.record.new_tokens == record.new_tokens
    # it streamed: the text grew in several visible steps while the buttons were in their running state
    texts = [t for t, _, _ in seen if t]
    assert len(set(texts)) >= 2 and all(want[0].startswith(t) for t in texts)
    assert all(gen and not stop for _, gen, stop in seen)
    assert not widget.generate_button.disabled and widget.stop_button.disabled
    assert "A function is" in widget.output.value and "tokens/s" in widget.status.value
    assert widget.status.value.count("stage ") == len(record.memory) == (3 if which == "split" else 1)


def test_stop_mid_run_ends_early_and_reenables_generate(models):
    by_name, tokenizer = models
    widget = gh.prompt_widget(by_name["split"], tokenizer)
    set_controls(widget, "The list", max_new_tokens=300, seed=1)

    def stop_once_text_shows(change):  # runs in the generation thread, like a click arriving mid-run
        if widget.text and not widget.stop_event.is_set():
            widget.stop_button.click()

    widget.output.observe(stop_once_text_shows, "value")
    widget.generate_button.click()
    assert widget.wait(timeout=120)
    got = widget.record.new_tokens
    assert 1 <= got < 300
    assert f"stopped after {got} of 300 tokens" in widget.status.value
    assert not widget.generate_button.disabled and widget.stop_button.disabled
    # what came out is exactly the start of the same seeded run
    prefix, _ = gh.generate_text(by_name["split"], tokenizer, "The list", max_new_tokens=got, seed=1)
    assert widget.text == prefix[0]
    # and the next run is not stopped by the old click
    widget.output.unobserve(stop_once_text_shows, "value")
    widget.max_new_tokens.value = 8
    widget.generate_button.click()
    assert widget.wait(timeout=120)
    full, record = gh.generate_text(by_name["split"], tokenizer, "The list", max_new_tokens=8, seed=1)
    assert widget.text == full[0] and widget.record.new_tokens == record.new_tokens
    assert "stopped" not in widget.status.value


@pytest.mark.timeout(240)
def test_pipeline_drives_the_widget_streaming_and_stopping(tiny, tiny_path):
    """Notebook 06 with notebook 05's pipeline: a model name, two stage processes, text streamed from the last
    stage, and Stop ending every stage; the text is the start of the same seeded generate_text run."""
    model, tokenizer = tiny
    widget = gh.prompt_widget("tiny", tokenizer, generate=gh.pipeline_generate(
        "cpu,cpu", options=gh.LaunchOptions(timeout=60)))
    set_controls(widget, "The list", max_new_tokens=300, seed=1)
    updates = []

    def stop_once_text_shows(change):
        updates.append(widget.text)
        if widget.text and not widget.stop_event.is_set():
            widget.stop_button.click()

    widget.output.observe(stop_once_text_shows, "value")
    widget.generate_button.click()
    assert widget.wait(timeout=180)
    assert widget.error is None, widget.message.value
    got = widget.record.new_tokens
    assert 1 <= got < 300 and widget.record.mode == "pipeline"
    assert f"stopped after {got} of 300 tokens" in widget.status.value
    prefix, _ = gh.generate_text(model, tokenizer, "The list", max_new_tokens=got, seed=1)
    assert widget.text == prefix[0] and len([u for u in updates if u]) >= 1


def test_pipeline_widget_refuses_while_this_kernel_holds_the_devices(tiny, monkeypatch):
    """Generate on the pipeline widget while a split model fills the device: one message naming the device, what is
    free and what the stages need, and no stage process started."""
    import gptj_split.plan
    import gptj_split.pipeline

    _, tokenizer = tiny
    monkeypatch.setattr(gptj_split.plan, "available_memory", lambda name: 2**20)  # 1 MiB free: a model holds the rest
    started = []
    monkeypatch.setattr(gptj_split.pipeline, "start_ranks", lambda *a, **k: started.append(a))
    widget = gh.prompt_widget("tiny", tokenizer, generate=gh.pipeline_generate("cpu,cpu"))
    set_controls(widget, "The list", max_new_tokens=4, seed=1)
    widget.generate_button.click()
    assert widget.wait(timeout=60)
    assert isinstance(widget.error, MemoryError) and not started
    assert re.search(r"the pipeline's stage processes need [\d.]+ MiB on the host, which has 1.00 MiB free now: a "
                     r"model this kernel still holds may take it \(del it, then gh.release_memory\(\)\)",
                     str(widget.error)), widget.error


@pytest.mark.parametrize("values, message", [
    (dict(temperature=0.0), "temperature=0.0: sampling needs a temperature above 0"),
    (dict(top_p=0.0), "top_p=0.0: it must be in (0, 1]"),
    (dict(prompt=""), "is empty: every prompt needs at least one token"),
    (dict(prompt="word " * 300, max_new_tokens=400), "more than the model's context of 512 tokens"),
])
def test_invalid_setting_shows_a_message(models, values, message):
    by_name, tokenizer = models
    widget = gh.prompt_widget(by_name["whole"], tokenizer, prompt="The list")
    for name, value in values.items():
        getattr(widget, name).value = value
    widget.generate_button.click()
    assert not widget.running() and widget.thread is None
    assert message in str(widget.error)
    assert html.escape(message) in widget.message.value and "Traceback" not in widget.message.value
    assert not widget.generate_button.disabled
    # fixing the setting clears the message on the next click
    widget.prompt.value, widget.temperature.value, widget.top_p.value = "The list", 1.0, 0.7
    widget.max_new_tokens.value = 4
    widget.generate_button.click()
    assert widget.wait(timeout=120) and widget.message.value == "" and widget.error is None
    assert 1 <= widget.record.new_tokens <= 4 and "tokens in " in widget.status.value


def test_error_during_a_run_is_shown_not_raised(models):
    by_name, tokenizer = models

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: device-side assert triggered (pretend)")

    widget = gh.prompt_widget(by_name["whole"], tokenizer, prompt="The list", generate=broken)
    widget.generate_button.click()
    assert widget.wait(timeout=30)
    assert "RuntimeError: CUDA error: device-side assert triggered (pretend)" in widget.message.value
    assert not widget.generate_button.disabled and widget.stop_button.disabled and widget.status.value == ""


def test_a_notebook_shows_the_widget_view(models):
    """What IPython hands the frontend for a cell ending in the widget: the box's view (ipywidgets 7 and 8 alike;
    7 has no `_repr_mimebundle_` of its own), and no traceback."""
    import ipywidgets
    from IPython.core.formatters import DisplayFormatter

    by_name, tokenizer = models
    widget = gh.prompt_widget(by_name["whole"], tokenizer)
    data, _ = DisplayFormatter().format(widget)
    view = data.get("application/vnd.jupyter.widget-view+json")
    assert view is not None, f"no widget view on ipywidgets {ipywidgets.__version__}: {sorted(data)}"
    assert view["model_id"] == widget.ui.model_id and view["version_major"] == 2
    assert "PromptWidget object at" not in data["text/plain"]


def test_closing_the_widget_lets_its_model_go(tiny_path):
    """ipywidgets keeps every open widget, and through its click handlers the prompt widget and its model, alive:
    after `close()` and `del`, the model is freed (notebook 06 frees it for the pipeline's stage processes)."""
    import gc
    import weakref

    model = gh.load_model(str(tiny_path))
    widget = gh.prompt_widget(model, gh.load_tokenizer(str(tiny_path)), prompt="The list", max_new_tokens=2)
    widget.generate_button.click()
    widget.wait()
    alive, widget_alive = weakref.ref(model), weakref.ref(widget)
    del model, widget
    gc.collect()
    assert alive() is not None and widget_alive() is not None  # held by the widgets' registry, through its handlers
    widget_alive().close()
    gc.collect()
    assert alive() is None


def test_greedy_greys_out_the_sampling_sliders(models):
    by_name, tokenizer = models
    widget = gh.prompt_widget(by_name["whole"], tokenizer)
    sliders = [widget.temperature, widget.top_p, widget.top_k]
    assert not any(s.disabled for s in sliders)
    widget.greedy.value = True
    assert all(s.disabled for s in sliders)
    widget.greedy.value = False
    assert not any(s.disabled for s in sliders)
    assert widget.max_new_tokens.max == by_name["whole"].config.n_positions - 1


def test_stopping_criteria_in_generate_text(models):
    by_name, tokenizer = models
    event = threading.Event()
    event.set()
    texts, record = gh.generate_text(by_name["split"], tokenizer, ["The list", "x"], max_new_tokens=10, greedy=True,
                                     stopping_criteria=[gh.StopOnEvent(event)])
    full, _ = gh.generate_text(by_name["split"], tokenizer, ["The list", "x"], max_new_tokens=10, greedy=True)
    assert record.new_tokens == 2  # one token each, then stopped
    assert [full[i].startswith(texts[i]) for i in range(2)] == [True, True]
    assert "stopping_criteria" not in record.settings
    assert "stopped after 2 of 10 tokens" in gh.format_run_line(record, stopped=True)
    event.clear()
    again, record = gh.generate_text(by_name["split"], tokenizer, ["The list", "x"], max_new_tokens=10, greedy=True,
                                     stopping_criteria=[gh.StopOnEvent(event)])
    assert again == full and record.new_tokens == 20
    assert gh.format_run_line(record).startswith("20 tokens in ")


def test_run_line_names_each_stage_and_each_gpu_once(models):
    by_name, tokenizer = models
    _, record = gh.generate_text(by_name["split"], tokenizer, "The list", max_new_tokens=6, greedy=True)
    line = gh.format_run_line(record)
    busy = record.busy_seconds()
    for s, row in enumerate(record.memory):
        assert f"stage {s} cpu: busy {busy[s] / record.total_seconds:.0%}, {gh.format_size(row.total_bytes)}" in line
    # as on one GPU split into budgets: stages share a device, whose allocation is shown once
    record.memory = [dataclasses.replace(row, device="cuda:0", cuda_allocated_bytes=3 << 30) for row in record.memory]
    line = gh.format_run_line(record)
    assert line.count("cuda:0 allocated 3.00 GiB") == 1 and line.count("stage ") == 3


# ---------------------------------------------------------------------------- the real browser

def browser_wanted() -> tuple[bool, str]:
    if os.environ.get("CI") == "true":
        return True, ""
    if Path(CHROMIUM).exists():
        return True, ""
    return False, (f"no browser: {CHROMIUM} is missing (apt-get install -y chromium); "
                   "the test runs whenever it is installed, and always when CI=true")


def descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def end_processes(procs: list) -> list:
    """Terminate, then kill, the given psutil processes; returns those still alive."""
    import psutil

    for action in ("terminate", "kill"):  # politely first, then for sure
        for p in procs:
            try:
                getattr(p, action)()
            except psutil.NoSuchProcess:
                pass
        _, procs = psutil.wait_procs(procs, timeout=5)
    return procs


def start_lab(folder: Path, home: Path, port: int, token: str, log) -> subprocess.Popen:
    """JupyterLab on 127.0.0.1 serving `folder`, with its own settings (no news toast), config and runtime dirs."""
    settings = home / "lab-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false",
                                                                          "checkForUpdates": False}))
    notebook = home / "lab-settings" / "@jupyterlab" / "notebook-extension"
    notebook.mkdir(parents=True)  # every cell stays in the page (by default cells out of view are dropped)
    (notebook / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JUPYTERLAB_SETTINGS_DIR": str(home / "lab-settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"), "JUPYTER_CONFIG_DIR": str(home / "config"),
           "JUPYTER_RUNTIME_DIR": str(home / "runtime"), "IPYTHONDIR": str(home / "ipython")}
    env.pop("MPLBACKEND", None)
    argv = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={folder}", "--ServerApp.open_browser=False"]
    if os.geteuid() == 0:  # CI runs as root; JupyterLab refuses that without this flag
        argv.append("--allow-root")
    return subprocess.Popen(argv, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_lab(proc: subprocess.Popen, url: str, log_path: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace").splitlines()[-5:]
            raise RuntimeError(f"JupyterLab exited with code {proc.returncode} before answering; its log ends:\n"
                               + "\n".join(tail))
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"JupyterLab did not answer {url} within {timeout} s")


def stop_lab(proc: subprocess.Popen, base: str, token: str) -> None:
    """Ask the server to shut down (it stops its kernels), then kill its process group if it lingers."""
    try:
        request = urllib.request.Request(f"{base}/api/shutdown", method="POST",
                                         headers={"Authorization": f"token {token}"})
        urllib.request.urlopen(request, timeout=5).close()
        proc.wait(timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        pass
    if proc.poll() is None:
        with_suppressed(lambda: os.killpg(proc.pid, signal.SIGKILL))
        with_suppressed(lambda: proc.wait(timeout=10))


def with_suppressed(action) -> None:
    try:
        action()
    except (OSError, subprocess.TimeoutExpired):
        pass


def wait_for_kernel(page) -> None:
    """Wait until the notebook's cells are shown and its kernel is idle (the status bar says so)."""
    page.wait_for_function("() => document.querySelectorAll('.jp-Notebook .jp-Cell').length > 3 && "
                           "[...document.querySelectorAll('.jp-StatusBar-TextItem')]"
                           ".some(e => /ipykernel\\) \\| Idle/.test(e.textContent))")


@pytest.mark.timeout(420)
def test_widget_in_a_real_browser(tmp_path, tiny_path):
    wanted, reason = browser_wanted()
    if not wanted:
        pytest.skip(reason)
    assert Path(CHROMIUM).exists(), f"CI=true but {CHROMIUM} is missing: .ci/run installs it (apt-get install chromium)"
    from playwright.sync_api import expect, sync_playwright

    folder = tmp_path / "notebooks"  # a copy: JupyterLab autosaves, and the committed notebook must stay as it is
    folder.mkdir()
    nb = json.loads(NOTEBOOK.read_text())  # up to the widget's cell: the browser drives that widget, nbval the rest
    shown = next(i for i, c in enumerate(nb["cells"]) if "display(widget)" in "".join(c["source"]))
    nb["cells"] = nb["cells"][:shown + 1]
    (folder / NOTEBOOK.name).write_text(json.dumps(nb))
    port, token = free_port(), os.urandom(16).hex()
    base = f"http://127.0.0.1:{port}"
    screenshot = tmp_path / "prompt_widget.png"
    log_path = tmp_path / "jupyterlab.log"
    started = time.monotonic()
    ours = []  # every process this test started (server, kernels, browser, playwright's driver)
    before = {p.pid for p in descendants(os.getpid())}
    committed = NOTEBOOK.read_bytes()
    lab = None
    with open(log_path, "wb") as log:
        try:
            lab = start_lab(folder, tmp_path, port, token, log)
            wait_for_lab(lab, f"{base}/api/status?token={token}", log_path)
            with sync_playwright() as pw:
                context = pw.chromium.launch_persistent_context(
                    str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
                    viewport={"width": 1280, "height": 1000})
                page = context.pages[0] if context.pages else context.new_page()
                try:
                    page.set_default_timeout(120_000)
                    page.goto(f"{base}/lab/tree/{NOTEBOOK.name}?token={token}")
                    page.locator(".jp-Notebook").first.wait_for()
                    wait_for_kernel(page)
                    page.get_by_role("menuitem", name="Run", exact=True).click()
                    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
                    widget = page.locator(".gptj-prompt-widget").first  # 06 also shows one on the pipeline
                    widget.wait_for()
                    page.wait_for_function(  # every cell ran: no "[*]" prompt left
                        "() => document.querySelectorAll('.jp-InputArea-prompt').length > 0 && "
                        "![...document.querySelectorAll('.jp-InputArea-prompt')]"
                        ".some(e => e.textContent.includes('*'))")
                    ours += descendants(lab.pid)
                    errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
                    assert errors.count() == 0, f"a cell wrote to stderr: {errors.first.inner_text()}"
                    widget.scroll_into_view_if_needed()
                    generate = widget.get_by_role("button", name="Generate")
                    stop = widget.get_by_role("button", name="Stop")
                    output = widget.locator(".gptj-output pre")
                    status = widget.locator(".gptj-status")

                    # a short run from a typed prompt
                    widget.locator("textarea").fill("A function is")
                    generate.click()
                    expect(output.locator("b")).to_have_text("A function is")
                    page.wait_for_function("() => { const p = document.querySelector('.gptj-output pre');"
                                           " return p && p.textContent.length > 'A function is'.length; }")
                    expect(status).to_contain_text(re.compile(r"^\d+ tokens( \(end of text\))? in "),
                                                   timeout=120_000)
                    expect(generate).to_be_enabled()
                    expect(stop).to_be_disabled()

                    # a long run, stopped as soon as text appears
                    readout = widget.locator(".widget-readout").first  # max new tokens: type into its readout
                    readout.click()
                    page.keyboard.press("Control+A")
                    page.keyboard.type("500")
                    page.keyboard.press("Enter")
                    expect(readout).to_have_text("500")
                    generate.click()
                    expect(generate).to_be_disabled()
                    page.wait_for_function("() => { const p = document.querySelector('.gptj-output pre');"
                                           " return p && p.textContent.length > 'A function is'.length; }")
                    stop.click()
                    expect(generate).to_be_enabled(timeout=60_000)
                    expect(stop).to_be_disabled()
                    line = status.inner_text()
                    match = re.search(r"stopped after (\d+) of 500 tokens", line)
                    assert match and int(match.group(1)) < 500, f"not stopped early: {line!r}"
                    assert widget.locator(".gptj-message").inner_text().strip() == ""
                    widget.scroll_into_view_if_needed()
                    page.screenshot(path=str(screenshot))
                    print(f"screenshot: {screenshot}")
                    print(f"after Stop: {line}")
                except Exception:
                    page.screenshot(path=str(tmp_path / "failure.png"))
                    print(f"screenshot at the failure: {tmp_path / 'failure.png'}")
                    raise
                finally:
                    ours += descendants(os.getpid())
                    context.close()
        finally:
            if lab is not None:
                ours += descendants(lab.pid)
                stop_lab(lab, base, token)
            ours += descendants(os.getpid())
            survivors = end_processes([p for pid, p in {p.pid: p for p in ours}.items() if pid not in before])
            print(f"browser test: {time.monotonic() - started:.1f} s end to end; JupyterLab log: {log_path}")
    assert lab.poll() is not None, "JupyterLab is still running"
    assert not survivors, f"processes survived the test: {survivors}"
    assert NOTEBOOK.read_bytes() == committed, "the committed notebook changed: the browser must work on a copy"
