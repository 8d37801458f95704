"""Notebook 06: type a prompt and watch it answer. An ipywidgets box with the sampling controls, Generate and Stop;
it generates in a background thread, streams the text as it comes, and works with ipywidgets 7 and 8.
"""

from __future__ import annotations

import math

import torch

from .devices import format_size
from .records import RunRecord
from .sampling import SAMPLING_DEFAULTS, Sampling, check_prompts
from .generate import generate_text
from .hub import load_config, resolve_model


class StopOnEvent:
    """A transformers stopping criterion: generation ends after the current token once `event` is set (notebook 06)."""

    def __init__(self, event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def format_run_line(record: RunRecord, stopped: bool = False) -> str:
    """One line after a widget run: how it ended, tokens/s, and each stage's device, busy share and memory (notebook
    06)."""
    asked = record.settings.get("max_new_tokens", record.new_tokens)
    ended = (f"stopped after {record.new_tokens} of {asked} tokens" if stopped and record.new_tokens < asked
             else f"{record.new_tokens} tokens" + (" (end of text)" if record.new_tokens < asked else ""))
    busy = record.busy_seconds()
    stages = [f"stage {s} {row.device}: busy {(busy[s] if s < len(busy) else 0) / record.total_seconds:.0%}, "
              f"{format_size(row.total_bytes)}" for s, row in enumerate(record.memory)]
    allocated = {row.device: row.cuda_allocated_bytes for row in record.memory if row.cuda_allocated_bytes is not None}
    stages += [f"{device} allocated {format_size(n)}" for device, n in allocated.items()]
    speed = "one token: no rate" if math.isnan(record.tokens_per_second) else f"{record.tokens_per_second:.1f} tokens/s"
    return " · ".join([f"{ended} in {record.total_seconds:.2f} s", speed, *stages])


class PromptWidget:
    """Prompt box, sampling controls, Generate/Stop and streamed text; generates in a background thread (notebook
    06)."""

    def __init__(self, model, tokenizer, prompt: str = "", max_new_tokens: int = 50, generate=None):
        import html
        import threading

        import ipywidgets as w

        self.model, self.tokenizer, self.escape = model, tokenizer, html.escape
        # a loaded model, or a name or folder (the pipeline's processes load their own stages)
        self.config = model.config if hasattr(model, "config") else load_config(str(resolve_model(str(model))))
        self.generate_fn = generate or generate_text
        self.stop_event, self.thread, self.record, self.error = threading.Event(), None, None, None
        self.prompt_used, self.text = "", ""
        limit = self.config.n_positions - 1
        wide = {"style": {"description_width": "9em"}, "layout": w.Layout(width="28em")}
        self.prompt = w.Textarea(value=prompt, placeholder="Type a prompt", description="prompt",
                                 layout=w.Layout(width="100%", height="5em"), style=wide["style"])
        self.max_new_tokens = w.IntSlider(min(max_new_tokens, limit), min=1, max=limit, description="max new tokens",
                                          **wide)
        self.temperature = w.FloatSlider(SAMPLING_DEFAULTS["temperature"], min=0.0, max=2.0, step=0.05,
                                         description="temperature", **wide)
        self.top_p = w.FloatSlider(SAMPLING_DEFAULTS["top_p"], min=0.0, max=1.0, step=0.05, description="top-p", **wide)
        self.top_k = w.IntSlider(SAMPLING_DEFAULTS["top_k"], min=0, max=200, description="top-k (0: off)", **wide)
        self.seed = w.IntText(0, description="seed", **wide)
        self.greedy = w.Checkbox(False, description="greedy (no sampling)", indent=False)
        self.generate_button = w.Button(description="Generate", button_style="primary", icon="play")
        self.stop_button = w.Button(description="Stop", button_style="danger", icon="stop", disabled=True)
        self.output = w.HTML().add_class("gptj-output")
        self.status = w.HTML().add_class("gptj-status")
        self.message = w.HTML().add_class("gptj-message")
        self.generate_button.on_click(self.start)
        self.stop_button.on_click(self.stop)
        self.greedy.observe(self.show_sampling, "value")
        controls = w.VBox([self.max_new_tokens, self.temperature, self.top_p, self.top_k, self.seed, self.greedy])
        self.ui = w.VBox([self.prompt, controls, w.HBox([self.generate_button, self.stop_button]), self.message,
                          self.output, self.status]).add_class("gptj-prompt-widget")

    def _repr_mimebundle_(self, **kwargs) -> dict:
        """What a notebook shows: the box's view. ipywidgets 8 makes the bundle; 7 (Colab's) only has
        `_ipython_display_`, so the same bundle is made here."""
        if hasattr(self.ui, "_repr_mimebundle_"):
            return self.ui._repr_mimebundle_(**kwargs)
        text = repr(self.ui)
        return {"text/plain": text if len(text) <= 110 else text[:110] + "…",
                "application/vnd.jupyter.widget-view+json": {"version_major": 2, "version_minor": 0,
                                                             "model_id": self.ui.model_id}}

    def show_sampling(self, change=None) -> None:
        """Grey out temperature, top-p and top-k while greedy is ticked."""
        for slider in (self.temperature, self.top_p, self.top_k):
            slider.disabled = self.greedy.value

    def settings(self) -> dict:
        """The controls' values as `generate_text` keywords: max_new_tokens and a checked `Sampling`."""
        sampling = Sampling(greedy=self.greedy.value, temperature=self.temperature.value, top_p=self.top_p.value,
                            top_k=self.top_k.value, seed=self.seed.value)
        return {"max_new_tokens": self.max_new_tokens.value, "sampling": sampling}

    def show_text(self, piece: str = "", stream_end: bool = False) -> None:
        """Append a streamed piece of text to the output, after the prompt in bold."""
        self.text += piece
        self.output.value = (f'<pre style="white-space: pre-wrap; margin: 0"><b>{self.escape(self.prompt_used)}</b>'
                             f"{self.escape(self.text)}</pre>")

    def show_error(self, err: Exception) -> None:
        """A readable message in the widget instead of a traceback."""
        self.error = err
        kind = "" if isinstance(err, ValueError) else f"{type(err).__name__}: "
        self.message.value = f'<span style="color: #b00020">{self.escape(kind + str(err))}</span>'

    def start(self, button=None) -> None:
        """Generate's click handler: check the settings here, then generate in a background thread."""
        import threading

        if self.running():
            return
        self.message.value, self.status.value, self.error = "", "", None
        prompt = self.prompt.value
        try:
            settings = self.settings()
            check_prompts(self.config, self.tokenizer, prompt, settings["max_new_tokens"])
        except ValueError as err:
            self.show_error(err)
            return
        self.stop_event.clear()
        self.prompt_used, self.text, self.record = prompt, "", None
        self.generate_button.disabled, self.stop_button.disabled = True, False
        self.show_text()
        self.status.value = "generating..."
        self.thread = threading.Thread(target=self.run, args=(prompt, settings), daemon=True)
        self.thread.start()

    def run(self, prompt: str, settings: dict) -> None:
        """The background thread: stream the text into the output, then show the run's line."""
        from transformers import TextStreamer

        try:
            streamer = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
            streamer.on_finalized_text = self.show_text
            _, self.record = self.generate_fn(self.model, self.tokenizer, prompt, stream=streamer,
                                              stopping_criteria=[StopOnEvent(self.stop_event)], **settings)
            self.status.value = self.escape(format_run_line(self.record, stopped=self.stop_event.is_set()))
        except Exception as err:  # shown in the widget: the UI must survive any failure of a run
            self.status.value = ""
            self.show_error(err)
        finally:
            self.generate_button.disabled, self.stop_button.disabled = False, True

    def stop(self, button=None) -> None:
        """Stop's click handler: generation ends after the token being computed."""
        self.stop_event.set()

    def running(self) -> bool:
        """Whether a generation is in progress."""
        return self.thread is not None and self.thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the current generation to end; True when none is left running."""
        if self.thread is not None:
            self.thread.join(timeout)
        return not self.running()

    def close(self) -> None:
        """End a run, close every control and let go of the model: ipywidgets keeps each open widget, and with its
        click handlers this object and its model, alive until it is closed (notebook 06)."""
        self.stop()
        self.wait()

        def close_all(widget) -> None:
            for child in getattr(widget, "children", ()):
                close_all(child)
            widget.close()

        close_all(self.ui)
        self.model = self.generate_fn = None


def prompt_widget(model, tokenizer, prompt: str = "", max_new_tokens: int = 50, generate=None) -> PromptWidget:
    """An interactive prompt for a split (or whole) model; `generate` has `generate_text`'s signature (notebook 06).

    `model` may be a loaded model or, for runners that load their own (like `pipeline_generate(devices)`), a name.
    """
    return PromptWidget(model, tokenizer, prompt=prompt, max_new_tokens=max_new_tokens, generate=generate)
