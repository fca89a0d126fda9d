"""Chat with a Base and an Instruct Falcon-H1 side by side: one prompt, two streaming answers.

    python demo/app.py                                   # the offline default's checkpoints (make run)
    python demo/app.py --base tiiuae/Falcon-H1-0.5B-Base --instruct tiiuae/Falcon-H1-0.5B-Instruct

Binds 127.0.0.1 unless --host says otherwise, and never reaches the network (Gradio's usage analytics are off).
Each model is loaded once; requests queue with a concurrency limit. Everything a client sends is bounded before
anything is tokenized or generated — the prompt, each history message, the number of history messages, the system
prompt, all of it together, then the prompt's tokens — and a request's generation stops after --max-seconds, so
no client can hold the models for long. A model error shows in its pane.
"""

from __future__ import annotations

import argparse
import os
import queue
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# before gradio is imported: its version check and telemetry read this switch (the UI also passes it explicitly)
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import gradio as gr  # noqa: E402

from demo.engine import ChatModel, PromptError, Settings, clean_prompt  # noqa: E402

DEFAULT_BASE, DEFAULT_INSTRUCT = "runs/offline/base", "runs/offline/dpo"  # the offline default: make run
CSS = """
#base-pane, #instruct-pane {border-radius: 12px}
.pane-title {font-weight: 600; margin-bottom: 0}
#notice p {color: #b45309}
"""


@dataclass(frozen=True)
class Limits:
    """What one request may send and take. The character limits are checked before anything is tokenized, the
    token limit before anything is generated; `seconds` ends a request's generation (the prompt's prefill is bounded
    by `prompt_tokens`)."""

    prompt_chars: int = 8000  # the new message
    message_chars: int = 8000  # each message of the history
    history_messages: int = 40  # messages of history per pane (20 exchanges)
    system_chars: int = 4000
    total_chars: int = 32000  # prompt, history and system prompt together
    prompt_tokens: int = 4096  # the rendered prompt, in each model's tokens
    new_tokens: int = 512  # the most a request may generate
    seconds: float = 60.0


def check_request(prompt: str, hists: dict, system_prompt, settings_values, limits: Limits) -> None:
    """Everything a client sent besides the prompt's own length (clean_prompt) → nothing, or a PromptError that
    names what is over its limit. Runs before anything is tokenized."""
    if not isinstance(system_prompt, (str, type(None))):
        raise PromptError("The system prompt is not text.")
    system = len(system_prompt or "")
    if system > limits.system_chars:
        raise PromptError(f"The system prompt has {system:,} characters; the limit is {limits.system_chars:,}.")
    for pane, hist in hists.items():
        total = len(prompt) + system + sum(len(text) for text in _history_texts(hist, pane, limits))
        if total > limits.total_chars:
            raise PromptError(
                f"The conversation with the {pane} model has {total:,} characters in all; the limit is "
                f"{limits.total_chars:,}. Clear the chat to go on."
            )
    _check_settings(settings_values, limits)


def _history_texts(hist, pane: str, limits: Limits) -> list[str]:
    if not isinstance(hist, list):
        raise PromptError(f"The {pane} chat history is not a list of messages.")
    if len(hist) > limits.history_messages:
        raise PromptError(
            f"The {pane} chat history has {len(hist)} messages; the limit is {limits.history_messages}. "
            "Clear the chat to go on."
        )
    texts = []
    for i, message in enumerate(hist, 1):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise PromptError(f"Message {i} of the {pane} chat history is not a user or assistant message.")
        content = message.get("content")
        parts = content if isinstance(content, list) else [content]
        if not all(isinstance(p, str) or (isinstance(p, dict) and isinstance(p.get("text"), str)) for p in parts):
            raise PromptError(f"Message {i} of the {pane} chat history holds something other than text.")
        text = content_text(content)
        if len(text) > limits.message_chars:
            raise PromptError(
                f"Message {i} of the {pane} chat history has {len(text):,} characters; the limit is "
                f"{limits.message_chars:,}."
            )
        texts.append(text)
    return texts


def _check_settings(values, limits: Limits) -> None:
    max_new_tokens, temperature, top_p, seed = values
    for name, value, low, high in (
        ("Max new tokens", max_new_tokens, 1, limits.new_tokens),
        ("Temperature", temperature, 0.0, 2.0),
        ("Top-p", top_p, 0.0, 1.0),
        ("Seed", 0 if seed is None else seed, 0, 2**31 - 1),
    ):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
            raise PromptError(f"{name} must be between {low} and {high}, got {value!r}.")


def _stats_md(stats: dict | None) -> str:
    if not stats:
        return ""
    n = stats["tokens"]
    return f"{n} token{'' if n == 1 else 's'} · {stats['seconds']} s · **{stats['tokens_per_s']} tokens/s**"


def prepare(panes: dict, limits: Limits, prompt, hists: dict, values, system_prompt):
    """A request checked against the limits, cheapest first → (prompt, notice, settings, {pane: prompt as seen});
    PromptError for the first limit it breaks."""
    text, notice = clean_prompt(prompt, limits.prompt_chars)
    check_request(text, hists, system_prompt, values, limits)
    max_new_tokens, temperature, top_p, seed = values
    settings = Settings(int(max_new_tokens), float(temperature), float(top_p), int(seed or 0), system_prompt or "")
    seen = {name: model.render(_turns(hists[name]), text, settings) for name, model in panes.items()}
    for name, model in panes.items():
        n = model.count_tokens(seen[name])
        if n > limits.prompt_tokens:
            raise PromptError(
                f"The conversation is {n:,} tokens for the {name} model; the limit is {limits.prompt_tokens:,}. "
                "Clear the chat or shorten the prompt."
            )
    return text, notice, settings, seen


def make_respond(base: ChatModel, instruct: ChatModel, limits: Limits = Limits()):
    panes = {"base": base, "instruct": instruct}

    def respond(prompt, base_hist, inst_hist, max_new_tokens, temperature, top_p, seed, system_prompt):
        """Streams both answers; yields (base_hist, inst_hist, base_stats, inst_stats, notice, prompt box,
        base prompt as seen, instruct prompt as seen)."""
        base_hist, inst_hist = (list(h) if isinstance(h, list) else h for h in (base_hist or [], inst_hist or []))
        hists = {"base": base_hist, "instruct": inst_hist}
        values = (max_new_tokens, temperature, top_p, seed)
        try:
            text, notice, settings, seen = prepare(panes, limits, prompt, hists, values, system_prompt)
        except PromptError as err:
            yield base_hist, inst_hist, "", "", f"⚠️ {err}", prompt, gr.skip(), gr.skip()
            return
        for h in hists.values():
            h += [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]
        stats = {"base": None, "instruct": None}
        updates: queue.Queue = queue.Queue()
        stop, timed_out = threading.Event(), threading.Event()
        timer = threading.Timer(limits.seconds, lambda: (timed_out.set(), stop.set()))

        def work(name):
            try:
                for out, st in panes[name].stream(_turns(hists[name])[:-2], text, settings, stop):
                    updates.put((name, out, st))
            except Exception as err:  # shown in the pane; the server keeps serving
                updates.put((name, f"⚠️ Model error: {type(err).__name__}: {err}", None))
            finally:
                updates.put((name, None, None))

        threads = [threading.Thread(target=work, args=(n,), daemon=True) for n in panes]
        timer.start()
        for t in threads:
            t.start()
        running = set(panes)
        note = f"ℹ️ {notice}" if notice else ""
        try:
            yield base_hist, inst_hist, "", "", note, "", seen["base"], seen["instruct"]
            while running:
                name, out, st = updates.get()
                if out is None:
                    running.discard(name)
                else:
                    hists[name][-1]["content"] = out
                    stats[name] = st or stats[name]
                if timed_out.is_set():
                    note = f"⏱️ The answers were stopped after {limits.seconds:g} s, the demo's time limit."
                yield (
                    base_hist,
                    inst_hist,
                    _stats_md(stats["base"]),
                    _stats_md(stats["instruct"]),
                    note,
                    "",
                    seen["base"],
                    seen["instruct"],
                )
        finally:
            timer.cancel()
            stop.set()  # Stop button or a closed page: end both generations

    return respond


def content_text(content) -> str:
    """Chatbot content as plain text: gradio ≥ 6 hands messages back as a list of typed parts."""
    if isinstance(content, list):
        return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
    return "" if content is None else str(content)


def _turns(history):
    return [{"role": m["role"], "content": content_text(m.get("content"))} for m in history]


def build_ui(base: ChatModel, instruct: ChatModel, limits: Limits = Limits()) -> gr.Blocks:
    max_new_tokens = limits.new_tokens
    with gr.Blocks(title="Falcon-H1 · Base vs Instruct", analytics_enabled=False) as ui:
        gr.Markdown(
            "# Falcon-H1 · Base vs Instruct\nOne prompt, two models. The **Base** model continues the "
            "conversation as plain text; the **Instruct** model gets it through its chat template."
        )
        with gr.Row(equal_height=True):
            with gr.Column():
                base_chat = gr.Chatbot(label=f"Base · {base.name}", height=430, elem_id="base-pane")
                base_stats = gr.Markdown(elem_id="base-stats")
            with gr.Column():
                inst_chat = gr.Chatbot(label=f"Instruct · {instruct.name}", height=430, elem_id="instruct-pane")
                inst_stats = gr.Markdown(elem_id="instruct-stats")
        notice = gr.Markdown(elem_id="notice")
        with gr.Row():
            prompt = gr.Textbox(
                placeholder="Ask both models… (Enter to send, Shift+Enter for a new line)",
                show_label=False,
                scale=8,
                max_lines=8,
                elem_id="prompt",
            )
            send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
            stop = gr.Button("Stop", scale=1, elem_id="stop")
            clear = gr.Button("Clear", scale=1, elem_id="clear")
        with gr.Accordion("Generation settings (both models)", open=False):
            with gr.Row():
                max_new = gr.Slider(
                    1, max(max_new_tokens, 1), value=min(128, max_new_tokens), step=1, label="Max new tokens"
                )
                temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature (0 = greedy)")
                top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p")
                seed = gr.Number(value=0, precision=0, minimum=0, maximum=2**31 - 1, label="Seed")
            system = gr.Textbox(label="System prompt (Instruct model)", lines=2)
        with gr.Accordion("Prompts as the models saw them", open=False, elem_id="seen-accordion"):
            with gr.Row():
                base_seen = gr.Textbox(label="Base (plain text)", lines=6, elem_id="base-seen", interactive=False)
                inst_seen = gr.Textbox(
                    label="Instruct (chat template)", lines=6, elem_id="instruct-seen", interactive=False
                )

        inputs = [prompt, base_chat, inst_chat, max_new, temperature, top_p, seed, system]
        outputs = [base_chat, inst_chat, base_stats, inst_stats, notice, prompt, base_seen, inst_seen]
        respond = make_respond(base, instruct, limits)
        go = send.click(respond, inputs, outputs, api_name="respond")
        go_enter = prompt.submit(respond, inputs, outputs, api_name=False)
        stop.click(None, None, None, cancels=[go, go_enter])
        clear.click(
            lambda: ([], [], "", "", "", "", ""),
            None,
            [base_chat, inst_chat, base_stats, inst_stats, notice, base_seen, inst_seen],
            api_name=False,
        )
    return ui


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=DEFAULT_BASE, help="Base checkpoint: local path or hub id")
    p.add_argument("--instruct", default=DEFAULT_INSTRUCT, help="Instruct checkpoint: local path or hub id")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 …")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bfloat16, float16, float32")
    p.add_argument("--concurrency", type=int, default=2, help="requests generated at once; the rest queue")
    p.add_argument("--max-prompt-chars", type=int, default=Limits.prompt_chars, help="the new message")
    p.add_argument("--max-message-chars", type=int, default=Limits.message_chars, help="each history message")
    p.add_argument("--max-history-messages", type=int, default=Limits.history_messages, help="per pane")
    p.add_argument("--max-system-chars", type=int, default=Limits.system_chars)
    p.add_argument("--max-total-chars", type=int, default=Limits.total_chars, help="prompt, history and system")
    p.add_argument("--max-prompt-tokens", type=int, default=Limits.prompt_tokens, help="the rendered prompt")
    p.add_argument("--max-new-tokens", type=int, default=Limits.new_tokens, help="upper end of the slider")
    p.add_argument("--max-seconds", type=float, default=Limits.seconds, help="a request's generation stops then")
    p.add_argument("--trust-remote-code", action="store_true")
    return p.parse_args(argv)


def limits_from(args) -> Limits:
    return Limits(
        prompt_chars=args.max_prompt_chars,
        message_chars=args.max_message_chars,
        history_messages=args.max_history_messages,
        system_chars=args.max_system_chars,
        total_chars=args.max_total_chars,
        prompt_tokens=args.max_prompt_tokens,
        new_tokens=args.max_new_tokens,
        seconds=args.max_seconds,
    )


def main(argv=None):
    args = parse_args(argv)
    for role, path in (("base", args.base), ("instruct", args.instruct)):
        if path in (DEFAULT_BASE, DEFAULT_INSTRUCT) and not (Path(path) / "config.json").exists():
            sys.exit(
                f"error: the offline default's {role} checkpoint {path!r} does not exist yet. Make it with "
                "`make run` (or `python -m align.pipeline`), or pass --base/--instruct (a path or hub id)."
            )
    models = [
        ChatModel(p, chat=c, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
        for p, c in ((args.base, False), (args.instruct, True))
    ]
    ui = build_ui(*models, limits_from(args))
    ui.queue(default_concurrency_limit=args.concurrency, max_size=64)
    ui.launch(server_name=args.host, server_port=args.port, show_error=True, css=CSS, theme=gr.themes.Soft())


if __name__ == "__main__":
    main()
