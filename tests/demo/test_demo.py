"""The demo in a real browser (headless Debian Chromium driven by Playwright), under concurrent clients, and
with bad input. The server runs as a subprocess on 127.0.0.1 with tiny checkpoints the test makes."""

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from align.offline.base import build_tokenizer
from align.offline.tasks import pretraining_documents
from demo.app import content_text
from demo.engine import ChatModel, CountingStreamer, PromptError, Settings, clean_prompt
from model import FalconH1ForCausalLM
from tests.conftest import free_port, tiny_config_for

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
INSTRUCT_REPLY = "Hello from the instruct model."
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROME_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


def _make_checkpoint(path: Path, tok, reply_text: str, steps: int = 80):
    """A tiny Falcon-H1 overfit on one reply, so it answers (nearly) every prompt with that text."""
    cfg = tiny_config_for(tok)
    torch.manual_seed(0)
    model = FalconH1ForCausalLM(cfg).train()
    ids = torch.tensor([tok(reply_text, add_special_tokens=False)["input_ids"]])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    for _ in range(steps):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval().save_pretrained(path)
    tok.save_pretrained(path)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    tok = build_tokenizer(pretraining_documents(100), vocab_size=300)
    _make_checkpoint(root / "base", tok, "User: hi\nAssistant: plain text from the base model.\nUser:")
    _make_checkpoint(
        root / "instruct",
        tok,
        tok.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": INSTRUCT_REPLY}], tokenize=False
        ),
    )
    port = free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "demo" / "app.py"),
            "--base",
            str(root / "base"),
            "--instruct",
            str(root / "instruct"),
            "--port",
            str(port),
            "--concurrency",
            "2",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env={**{k: v for k, v in os.environ.items() if k != "GRADIO_ANALYTICS_ENABLED"}, "HF_HUB_OFFLINE": "1"},
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError((root / "server.log").read_text()) from None
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("demo server did not start:\n" + (root / "server.log").read_text())
    yield url, root / "server.log"
    proc.terminate()
    proc.wait(timeout=20)
    log.close()


def _ask(url, prompt, n=1, max_new_tokens=8):
    from gradio_client import Client

    client = Client(url, verbose=False)
    return client.predict(prompt, [], [], max_new_tokens, 0.0, 1.0, 0, "", api_name="/respond")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_browser_streams_both_panes_and_instruct_uses_the_chat_format(server):
    from playwright.sync_api import sync_playwright

    url, _ = server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROME_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(url)
        page.locator("#prompt textarea").fill("What is 2 plus 3?")
        page.locator("#send").click()
        for pane in ("#base-pane", "#instruct-pane"):
            bot = page.locator(f'{pane} [data-testid="bot"]').last
            bot.wait_for(timeout=60_000)
            page.wait_for_function(
                "sel => { const m = document.querySelectorAll(sel); return m.length && m[m.length-1].innerText.trim().length > 0 }",
                arg=f'{pane} [data-testid="bot"]',
                timeout=60_000,
            )
            assert "What is 2 plus 3?" in page.locator(f'{pane} [data-testid="user"]').last.inner_text()
        page.wait_for_function(  # the streamed answers complete: each model's own reply, nothing else
            "() => document.querySelector('#instruct-pane').innerText.includes('Hello from the instruct')"
            " && document.querySelector('#base-pane').innerText.includes('plain text from the base')",
            timeout=60_000,
        )
        page.wait_for_function(
            "() => document.querySelector('#instruct-stats').innerText.includes('tokens/s')", timeout=60_000
        )
        page.get_by_text("Prompts as the models saw them").click()
        seen_instruct = page.locator("#instruct-seen textarea").input_value()
        seen_base = page.locator("#base-seen textarea").input_value()
        assert "<|im_start|>user\nWhat is 2 plus 3?<|im_end|>" in seen_instruct
        assert seen_instruct.endswith("<|im_start|>assistant\n")
        assert seen_base == "User: What is 2 plus 3?\nAssistant:" and "<|im_start|>" not in seen_base
        # a second turn: the history reaches the Instruct model through its template
        page.locator("#prompt textarea").fill("And 4 plus 4?")
        page.locator("#send").click()
        page.wait_for_function(
            "() => document.querySelector('#instruct-seen textarea').value.includes('4 plus 4')", timeout=60_000
        )
        seen_instruct = page.locator("#instruct-seen textarea").input_value()
        assert seen_instruct.count("<|im_start|>user") == 2 and seen_instruct.count("<|im_start|>assistant") == 2
        page.wait_for_function(
            "() => document.querySelectorAll('#instruct-pane [data-testid=user]').length == 2", timeout=60_000
        )
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "demo.png"), full_page=True)
        browser.close()
    assert (ARTIFACTS / "demo.png").stat().st_size > 10_000


def test_concurrent_clients_all_get_answers(server):
    url, log = server
    results, errors = [None] * 5, []

    def client(i):
        try:
            results[i] = _ask(url, f"Which number comes after {i}?")
        except Exception as err:
            errors.append(err)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not errors, errors
    for i, out in enumerate(results):
        base_hist, inst_hist = out[0], out[1]
        assert base_hist[-1]["role"] == inst_hist[-1]["role"] == "assistant"
        assert content_text(base_hist[-1]["content"]).startswith("plain"), i  # both panes answered
        assert content_text(inst_hist[-1]["content"]).startswith("Hello from"), i
        assert content_text(inst_hist[0]["content"]) == f"Which number comes after {i}?"
    text = log.read_text()
    assert "Traceback" not in text and "ERROR" not in text, text[-2000:]


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("", "empty"),
        ("   \n\t ", "empty"),
        ("x" * 100_000, "limit is 8,000"),
        ("\x00\x07\x1b", "empty after removing unprintable"),
    ],
)
def test_bad_input_gets_a_message_not_a_crash(server, prompt, message):
    url, _ = server
    out = _ask(url, prompt)
    assert message in out[4] and out[0] == [] and out[1] == []


def test_unprintable_characters_are_removed_with_a_notice(server):
    url, _ = server
    out = _ask(url, "hi\x00 there\x07")
    assert "removed 2 unprintable" in out[4]
    assert content_text(out[1][0]["content"]) == "hi there"


def test_clean_prompt_rules():
    assert clean_prompt("  a\tb\nc  ", 10) == ("a\tb\nc", None)
    with pytest.raises(PromptError, match="11 characters; the limit is 10"):
        clean_prompt("x" * 11, 10)
    assert json.dumps(clean_prompt("é中文😀", 10)[0], ensure_ascii=False) == '"é中文😀"'


def test_answers_stream_token_by_token(server):
    from gradio_client import Client

    url, _ = server
    job = Client(url, verbose=False).submit("What is 1 plus 1?", [], [], 12, 0.0, 1.0, 0, "", api_name="/respond")
    job.result(timeout=120)
    updates = job.outputs()
    assert len(updates) >= 4  # the first (empty) frame, several partial answers, the final one
    lengths = [len(content_text(u[1][-1]["content"])) for u in updates if u[1]]
    assert lengths == sorted(lengths) and lengths[-1] > lengths[0]


def test_the_pane_counts_generated_tokens_not_a_retokenization(tmp_path):
    tok = build_tokenizer(pretraining_documents(100), vocab_size=300)
    # A merged word streamed one character token at a time: its text re-tokenizes to fewer tokens.
    vocab = tok.get_vocab()
    word = max((t for t in vocab if t.isalpha() and all(c in vocab for c in t)), key=len)
    ids = [vocab[c] for c in word] * 3
    assert len(tok("".join(tok.decode(i) for i in ids), add_special_tokens=False)["input_ids"]) != len(ids)
    streamer = CountingStreamer(tok, skip_prompt=True)
    streamer.put(torch.tensor([[5, 6, 7]]))  # the prompt
    for i in ids:
        streamer.put(torch.tensor([i]))
    streamer.end()
    assert streamer.generated == len(ids)

    torch.manual_seed(0)
    FalconH1ForCausalLM(tiny_config_for(tok)).eval().save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    chat = ChatModel(str(tmp_path), chat=False, device="cpu")
    *_, (_, stats) = chat.stream([], "hello", Settings(max_new_tokens=7, temperature=0.0), threading.Event())
    assert 1 <= stats["tokens"] <= 7 and stats["tokens_per_s"] > 0


class _Broken:
    name, chat = "broken", True

    def render(self, history, prompt, settings):
        return prompt

    def count_tokens(self, text):
        return len(text.split())

    def stream(self, *args):
        raise RuntimeError("CUDA out of memory (simulated)")
        yield  # a generator, like ChatModel.stream


class _Echo(_Broken):
    name = "echo"

    def stream(self, history, prompt, settings, stop):
        yield prompt.upper(), {"tokens": 1, "seconds": 0.1, "tokens_per_s": 10.0}


def test_a_model_error_is_shown_in_its_pane_and_the_other_pane_still_answers():
    from demo.app import Limits, make_respond

    respond = make_respond(_Broken(), _Echo(), Limits(prompt_chars=100))
    *_, last = respond("hello", [], [], 8, 0.0, 1.0, 0, "")
    base_hist, inst_hist = last[0], last[1]
    assert "Model error: RuntimeError: CUDA out of memory" in base_hist[-1]["content"]
    assert inst_hist[-1]["content"] == "HELLO"


def test_missing_default_checkpoints_give_the_command_that_makes_them(tmp_path, monkeypatch):
    from demo.app import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=r"make run"):
        main([])


def test_a_seed_reproduces_sampled_answers_while_both_panes_sample(server):
    from gradio_client import Client

    url, _ = server
    client = Client(url, verbose=False)
    ask = lambda seed: client.predict("Say something", [], [], 12, 2.0, 1.0, seed, "", api_name="/respond")
    first, again, other = ask(7), ask(7), ask(8)
    answers = lambda out: (content_text(out[0][-1]["content"]), content_text(out[1][-1]["content"]))
    assert answers(first) == answers(again)
    assert answers(first) != answers(other)


class _Recorder(_Echo):
    """Answers at once and remembers whether anything reached generation."""

    def __init__(self):
        self.streamed = 0

    def stream(self, history, prompt, settings, stop):
        self.streamed += 1
        yield from super().stream(history, prompt, settings, stop)


def _turn(role, text):
    return {"role": role, "content": text}


LIMITS = dict(
    prompt_chars=100, message_chars=200, history_messages=4, system_chars=50, total_chars=400, prompt_tokens=20
)
OK = ("hi", [], [], 8, 0.0, 1.0, 0, "")  # prompt, base history, instruct history, max new, temperature, top-p, seed


@pytest.mark.parametrize(
    "change, message",
    [
        ({0: "x" * 101}, "The prompt has 101 characters; the limit is 100"),
        ({2: [_turn("user", "x" * 100_000)]}, "Message 1 of the instruct chat history has 100,000 characters"),
        (
            {1: [_turn("user", "a"), _turn("assistant", "b")] * 3},
            "The base chat history has 6 messages; the limit is 4",
        ),
        ({7: "s" * 51}, "The system prompt has 51 characters; the limit is 50"),
        (
            {2: [_turn("user", "y" * 190)] * 2 + [_turn("assistant", "z" * 30)]},
            "instruct model has 412 characters in all; the limit is 400",
        ),
        ({1: [{"role": "system", "content": "x"}]}, "Message 1 of the base chat history is not a user or assistant"),
        ({1: ["just a string"]}, "Message 1 of the base chat history is not a user or assistant"),
        ({2: [_turn("user", {"path": "/etc/passwd"})]}, "holds something other than text"),
        ({1: "not a list"}, "The base chat history is not a list of messages"),
        ({3: 10_000}, "Max new tokens must be between 1 and 512, got 10000"),
        ({4: 50.0}, "Temperature must be between 0.0 and 2.0"),
        ({6: 2**40}, "Seed must be between 0 and 2147483647"),
        ({7: ["not", "text"]}, "The system prompt is not text"),
        ({0: "w " * 21}, "The conversation is 21 tokens for the base model; the limit is 20"),
    ],
)
def test_each_limit_refuses_before_anything_is_generated(change, message):
    """Every user-controlled input is bounded; a refusal names what is over which limit, and nothing runs."""
    from demo.app import Limits, make_respond

    base, instruct = _Recorder(), _Recorder()
    args = list(OK)
    for i, value in change.items():
        args[i] = value
    outputs = list(make_respond(base, instruct, Limits(**LIMITS))(*args))
    assert len(outputs) == 1 and message in outputs[0][4], outputs[0][4]
    assert base.streamed == instruct.streamed == 0
    # the same request within the limits is answered
    *_, last = make_respond(base, instruct, Limits(**LIMITS))(*OK)
    assert last[1][-1]["content"] == "HI" and instruct.streamed == 1


class _Endless(_Echo):
    """Generates until stopped, as a slow model with a huge max_new_tokens would."""

    def stream(self, history, prompt, settings, stop):
        n = 0
        while not stop.wait(0.01):
            n += 1
            yield "x" * n, {"tokens": n, "seconds": 0.01 * n, "tokens_per_s": 100.0}


def test_a_request_is_stopped_at_the_time_limit():
    from demo.app import Limits, make_respond

    t = time.perf_counter()
    *_, last = make_respond(_Endless(), _Endless(), Limits(seconds=0.5))(*OK)
    took = time.perf_counter() - t
    assert 0.5 <= took < 5.0, took
    assert "stopped after 0.5 s, the demo's time limit" in last[4] and last[1][-1]["content"].startswith("xxx")


def test_a_hostile_client_does_not_slow_a_normal_one(server):
    """Over-long histories and system prompts through the API (what the prompt box cannot send) are refused before
    anything is tokenized; a normal request sent meanwhile answers within a few times its unloaded latency."""
    from gradio_client import Client

    url, _ = server
    client = Client(url, verbose=False)
    normal = ("What is 2 plus 2?", [], [], 8, 0.0, 1.0, 0, "")

    def timed():
        t = time.perf_counter()
        out = client.predict(*normal, api_name="/respond")
        assert content_text(out[1][-1]["content"]).startswith("Hello from")
        return time.perf_counter() - t

    timed()  # warm-up
    unloaded = sorted(timed() for _ in range(3))[1]
    text = lambda t: [{"type": "text", "text": t}]  # gradio 6's message content: typed parts
    history = [{"role": "user", "content": text("x" * 100_000)}, {"role": "assistant", "content": text("ok")}]
    hostile = [
        ("hi", history, history, 8, 0.0, 1.0, 0, ""),
        ("hi", [], [], 8, 0.0, 1.0, 0, "s" * 100_000),
        ("hi", [{"role": "user", "content": text("y")}] * 5000, [], 8, 0.0, 1.0, 0, ""),
    ] * 2
    jobs = [Client(url, verbose=False).submit(*h, api_name="/respond") for h in hostile]
    loaded = timed()
    assert loaded < 4 * unloaded + 0.5, (loaded, unloaded)
    refusals = [job.result(timeout=60)[4] for job in jobs]
    assert all("the limit is" in r for r in refusals), refusals


def test_the_demo_never_reaches_the_network(monkeypatch):
    """Gradio's usage analytics (version check, launch and error telemetry) stay off: no host but this one is
    looked up while the app is built, launched and used."""
    import socket

    from demo.app import build_ui

    looked_up = []
    resolve = socket.getaddrinfo

    def recording(host, *args, **kwargs):
        if host not in ("127.0.0.1", "localhost", "::1", "0.0.0.0", None):
            looked_up.append(host)
        return resolve(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", recording)
    ui = build_ui(_Echo(), _Echo())
    ui.queue()
    port = free_port()
    ui.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).read()
        time.sleep(1.0)  # telemetry runs in background threads
    finally:
        ui.close()
    assert ui.analytics_enabled is False and os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
    assert looked_up == [], looked_up
