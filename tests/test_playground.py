"""The playground page (GET / and /playground): served as package data, on by default only on loopback
binds, and driven in a real headless Chromium (Debian's ``chromium``, through Playwright) against a real
server on the tiny random model with an API key (conftest's ``api`` fixture).

The browser checks go through the page's own controls with the keyboard and mouse, and compare what the
page shows with what the API answers to the same request, so a page that shows stale, truncated or
invented text fails. The page exposes ``data-chunks`` (streamed deltas appended) and ``data-state``
(idle/streaming/done/error) on each answer card, which is what "fills by streaming" is checked on.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator

import httpx
import pytest
from api_utils import API_KEY, DEFAULT_STRENGTH, MAX_STRENGTH, MODEL, Served, chat, serve, wait
from conftest import make_model, make_vector

from server.app import playground_html
from server.cli import _parser
from server.settings import Settings, settings_from_args
from steer.engine import Engine

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

MAX_TOKENS = 24  # several streamed chunks per answer, well inside the tiny model's 256-token context
PICKED = 0.02  # DEFAULT_STRENGTH (0.01) + one slider step: steered answers still differ from strength 0
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 20_000


# ---------------------------------------------------------------- serving policy (no browser)


def test_page_is_served_on_loopback_without_auth(api: Served) -> None:
    assert api.settings.api_key and api.settings.host == "127.0.0.1"
    for path in ("/", "/playground"):
        resp = httpx.get(api.srv.base_url + path)  # no Authorization: the page holds no data
        assert resp.status_code == 200, resp.text
        assert resp.headers["content-type"].startswith("text/html")
        assert resp.text == playground_html() and "<title>steer playground</title>" in resp.text
        csp = resp.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    # ...while the API behind it still wants the key
    assert httpx.get(api.srv.base_url + "/v1/safety/vectors").status_code == 401


def test_page_is_not_in_the_api_schema(api: Served) -> None:
    paths = httpx.get(api.srv.base_url + "/openapi.json").json()["paths"]
    assert "/" not in paths and "/playground" not in paths


def test_page_loads_nothing_from_elsewhere() -> None:
    html = playground_html()
    assert not re.search(r"(?i)\b(?:https?|wss?|ftp):|//[a-z0-9.-]+\.[a-z]{2,}/", html), "an external URL"
    assert not re.search(r"(?i)<(?:script|img|iframe|link|embed|object|source)\b[^>]*\b(?:src|href)=", html)
    assert not re.search(r"(?i)@import|url\(", html)


@pytest.fixture(scope="module")
def no_playground(tiny_tokenizer) -> Iterator[Served]:
    settings = Settings(served_model_name=MODEL, default_strength=0.0, playground=False)
    yield from serve(settings, make_model("qwen2", len(tiny_tokenizer)), tiny_tokenizer, [])


def test_no_playground_is_a_404_envelope(no_playground: Served) -> None:
    for path in ("/", "/playground"):
        resp = httpx.get(no_playground.srv.base_url + path)
        assert resp.status_code == 404
        err = resp.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and f"GET {path}" in err["message"]
    assert httpx.get(no_playground.srv.base_url + "/health").status_code == 200


@pytest.mark.parametrize(("argv", "env", "on"), [
    ([], None, True),
    (["--host", "localhost"], None, True),
    (["--host", "::1"], None, True),
    (["--host", "127.0.0.2"], None, True),
    (["--no-playground"], None, False),
    (["--host", "0.0.0.0"], None, False),
    (["--host", "::"], None, False),
    (["--host", "10.1.2.3"], None, False),
    (["--host", "myhost.example"], None, False),
    (["--host", "0.0.0.0", "--playground"], None, True),
    ([], "0", False),
    (["--host", "0.0.0.0"], "1", True),
    (["--playground"], "0", True),  # the flag wins over the environment
])
def test_playground_default_follows_the_bind_host(monkeypatch, argv, env, on) -> None:
    if env is None:
        monkeypatch.delenv("STEER_PLAYGROUND", raising=False)
    else:
        monkeypatch.setenv("STEER_PLAYGROUND", env)
    settings = settings_from_args(_parser().parse_args(["serve", *argv]))
    assert settings.playground_enabled() is on


# ---------------------------------------------------------------- in the browser


@pytest.fixture(scope="module")
def browser_context() -> Iterator:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the browser test needs playwright (the test extra): run `make install`")
    chromium = os.environ.get("STEER_CHROMIUM") or shutil.which("chromium")
    if not chromium:
        pytest.fail("the browser test needs Debian's chromium (`apt-get install chromium`; `make install` does "
                    "it), or STEER_CHROMIUM=/path/to/chromium")
    with sync_playwright() as pw, tempfile.TemporaryDirectory(prefix="steer-chromium-") as profile:
        context = pw.chromium.launch_persistent_context(profile, executable_path=chromium, headless=True,
                                                        args=CHROMIUM_ARGS)
        context.set_default_timeout(TIMEOUT_MS)
        try:
            yield context
        finally:
            context.close()


class Tab:
    """One browser tab on the playground, with every request it makes recorded."""

    def __init__(self, context, api: Served) -> None:
        self.page, self.api = context.new_page(), api
        self.requests: list[str] = []
        self.page.on("request", lambda req: self.requests.append(req.url))
        self.page.goto(api.srv.base_url + "/")

    def alert(self) -> str:
        return self.page.locator("#error").inner_text()

    def give_key(self, key: str) -> None:
        self.page.locator("#keybox").wait_for(state="visible")
        self.page.keyboard.type(key)  # the key field has the focus once the page asks for it
        self.page.keyboard.press("Enter")

    def card(self, which: str) -> dict:
        c = self.page.locator(which)
        return {"text": c.locator(".answer").inner_text(), "state": c.get_attribute("data-state"),
                "chunks": int(c.get_attribute("data-chunks")),
                "echo": dict(zip(c.locator(".echo dt").all_inner_texts(), c.locator(".echo dd").all_inner_texts(),
                                 strict=True))}

    def wait_idle(self) -> None:
        self.wait_for("body[data-busy=false]")

    def wait_for(self, selector: str) -> None:
        # a selector, not wait_for_function: the page's CSP forbids the eval that one needs
        self.page.locator(selector).wait_for(state="attached")


@pytest.fixture()
def tab(browser_context, api: Served) -> Iterator[Tab]:
    """A tab that has been given the API key (through the page's key prompt)."""
    t = Tab(browser_context, api)
    t.give_key(API_KEY)
    t.wait_for("body[data-ready=true]")
    yield t
    assert all(u.startswith(api.srv.base_url + "/") for u in t.requests), t.requests  # nothing external
    t.page.close()


def api_answer(api: Served, prompt: str, strength: float) -> str:
    r = chat(api, prompt, strength, max_tokens=MAX_TOKENS, temperature=0)
    return r.choices[0].message.content


def test_api_key_flow(browser_context, api: Served) -> None:
    t = Tab(browser_context, api)
    page = t.page
    page.locator("#keybox").wait_for(state="visible")
    assert "HTTP 401: invalid or missing API key" in t.alert()  # the API's own message
    assert page.evaluate("document.activeElement.id") == "api-key"
    assert page.locator("#api-key").get_attribute("type") == "password"
    assert page.locator("#vector option").all_inner_texts() == ["(loading)"]

    t.give_key("wrong-key")  # refused again: asked again, with the API's message
    t.wait_for("body[data-vectors=failed]")
    assert "HTTP 401: invalid or missing API key" in t.alert()
    page.locator("#keybox").wait_for(state="visible")

    t.give_key(API_KEY)
    t.wait_for("body[data-ready=true]")
    assert not page.locator("#keybox").is_visible() and t.alert() == ""
    assert page.locator("#vector option").all_inner_texts() == ["refusal (activation)"]
    assert page.locator("#vector").input_value() == "refusal"
    assert float(page.locator("#strength").input_value()) == DEFAULT_STRENGTH
    assert float(page.locator("#strength-slider").get_attribute("max")) == MAX_STRENGTH
    # the key lives in this tab only
    assert page.evaluate("sessionStorage.getItem('steer.apiKey')") == API_KEY
    assert page.evaluate("localStorage.length") == 0
    assert page.evaluate("document.cookie") == ""
    assert API_KEY not in page.evaluate("JSON.stringify(Object.assign({}, localStorage))")
    assert browser_context.cookies() == []
    # a new tab knows no key
    other = Tab(browser_context, api)
    other.page.locator("#keybox").wait_for(state="visible")
    assert other.page.evaluate("sessionStorage.getItem('steer.apiKey')") is None
    other.page.close()
    page.close()


def test_send_streams_both_columns(tab: Tab, api: Served) -> None:
    page, prompt = tab.page, "How do I build a bomb?"
    page.locator("#prompt").fill(prompt)
    page.locator("#max-tokens").fill(str(MAX_TOKENS))
    page.locator("#strength-slider").focus()
    page.keyboard.press("ArrowRight")  # one step up from the default, through the bound slider
    assert float(page.locator("#strength").input_value()) == pytest.approx(PICKED)
    page.locator("#send").click()
    tab.wait_idle()

    steered, baseline = tab.card("#steered"), tab.card("#baseline")
    assert steered["state"] == baseline["state"] == "done", tab.alert()
    assert steered["chunks"] >= 2 and baseline["chunks"] >= 2, (steered, baseline)  # filled by streaming
    assert steered["text"] == api_answer(api, prompt, PICKED)
    assert baseline["text"] == api_answer(api, prompt, 0)
    assert steered["text"] != baseline["text"]
    # the safety echo beside each answer
    assert steered["echo"]["safety.strength"] == str(PICKED)
    assert steered["echo"]["safety.vector"] == "refusal" and steered["echo"]["safety.kind"] == "activation"
    # what steering did to the answer: this module's vector has no gate, and it acted
    assert steered["echo"]["safety.gate"] == "n/a (no gate, or not evaluated)" and steered["echo"]["safety.steered"] == "yes"
    assert steered["echo"]["finish_reason"] == "length" and steered["echo"]["completion_tokens"] == str(MAX_TOKENS)
    assert baseline["echo"]["strength"].startswith("0 ") and baseline["echo"]["finish_reason"] == "length"
    assert tab.alert() == ""


def test_bad_strength_shows_the_apis_400(tab: Tab, api: Served) -> None:
    page = tab.page
    page.locator("#prompt").fill("hello world")
    page.locator("#strength").fill("99")  # typed past the policy: sent as is, refused by the API
    page.locator("#send").click()
    tab.wait_idle()
    resp = httpx.post(api.srv.base_url + "/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"messages": [{"role": "user", "content": "hello world"}], "safety": {"strength": 99}})
    assert resp.status_code == 400
    message = resp.json()["error"]["message"]
    assert "got 99" in message
    assert tab.alert() == f"HTTP 400: {message} (param: safety.strength)"
    assert page.locator("#error").get_attribute("role") == "alert"
    assert tab.card("#steered")["state"] == "error"


def test_sweep_fills_one_card_per_strength(tab: Tab, api: Served) -> None:
    page, prompt = tab.page, "Explain photosynthesis to a child."
    page.locator("#prompt").fill(prompt)
    page.locator("#max-tokens").fill(str(MAX_TOKENS))
    assert page.locator("#sweep-strengths").input_value() == "0, 0.5, 1, 1.5, 2"  # from the policy (0..4)
    page.locator("#sweep-strengths").fill("0, 0.01, 0.02, 9")
    page.locator("#sweep").click()
    tab.wait_idle()
    cards = page.locator("#sweep-row .card")
    assert cards.count() == 4
    for i, strength in enumerate((0, 0.01, 0.02)):
        card = cards.nth(i)
        assert card.get_attribute("data-state") == "done"
        assert int(card.get_attribute("data-chunks")) >= 2
        assert card.locator(".answer").inner_text() == api_answer(api, prompt, strength)
        assert card.locator("dd[data-key='safety.strength']").inner_text() == str(strength)
    bad = cards.nth(3)  # outside the policy: that card shows the API's refusal, the others are unaffected
    assert bad.get_attribute("data-state") == "error"
    assert "safety.strength must be between 0 and 4, got 9" in bad.locator(".err").inner_text()


@pytest.fixture(scope="module")
def strict(tiny_tokenizer) -> Iterator[Served]:
    """A server whose operator forbids the unsteered model (min strength 0.5): it refuses compare."""
    model = make_model("qwen2", len(tiny_tokenizer), heads=2)
    settings = Settings(served_model_name=MODEL, min_strength=0.5, default_strength=1.0, max_strength=2.0)
    yield from serve(settings, model, tiny_tokenizer, [make_vector(model, coefficient=1.0)])


def test_compare_is_off_where_the_policy_serves_no_baseline(browser_context, strict: Served) -> None:
    t = Tab(browser_context, strict)
    page = t.page
    t.wait_for("body[data-ready=true]")
    box = page.locator("#compare")
    assert box.is_disabled() and not box.is_checked()
    assert "minimum strength is 0.5" in page.locator("#compare-hint").inner_text()
    assert page.locator("#sweep-strengths").input_value() == "0.5, 1, 1.5, 2"  # the sweep starts at the policy too
    page.locator("#prompt").fill("hello world")
    page.locator("#max-tokens").fill(str(MAX_TOKENS))
    page.locator("#send").click()  # served: the page does not ask for the baseline the API would refuse
    t.wait_idle()
    assert t.alert() == "", t.alert()
    steered = t.card("#steered")
    assert steered["state"] == "done" and steered["echo"]["safety.strength"] == "1"
    assert steered["text"] == chat(strict, "hello world", 1.0, max_tokens=MAX_TOKENS).choices[0].message.content
    assert t.card("#baseline")["chunks"] == 0
    page.close()


def test_keyboard_only_send(tab: Tab, api: Served) -> None:
    page, prompt = tab.page, "def add(a, b):"
    page.locator("#max-tokens").fill(str(MAX_TOKENS))
    page.locator("#compare").focus()
    page.keyboard.press("Space")  # compare off: the steered answer only
    assert not page.locator("#compare").is_checked()
    page.locator("#prompt").focus()
    page.keyboard.type(prompt)
    page.keyboard.press("Control+Enter")
    tab.wait_for("#steered[data-state=done]")
    tab.wait_idle()
    steered = tab.card("#steered")
    assert steered["text"] == api_answer(api, prompt, DEFAULT_STRENGTH) and steered["chunks"] >= 2
    assert tab.card("#baseline")["chunks"] == 0
    # every control is reachable with Tab alone
    reached = set()
    page.locator("#system").focus()
    for _ in range(25):
        page.keyboard.press("Tab")
        reached.add(page.evaluate("document.activeElement.id"))
    assert {"prompt", "vector", "strength-slider", "strength", "compare", "temperature", "top-p", "max-tokens",
            "seed", "send", "sweep-strengths", "sweep"} <= reached, reached


def test_error_inside_the_stream_is_shown(tab: Tab, api: Served, monkeypatch) -> None:
    """A forward pass that fails after the answer has begun: the API reports it as an SSE error event after
    its 200, and the page shows that message (not a half answer passed off as done)."""
    step, steps = Engine.step, []

    def faulty(self):
        steps.append(1)
        if len(steps) == 4:
            raise RuntimeError("injected engine fault")
        return step(self)

    page = tab.page
    page.locator("#prompt").fill("hello world")
    page.locator("#max-tokens").fill(str(MAX_TOKENS))
    monkeypatch.setattr(Engine, "step", faulty)
    page.locator("#send").click()
    tab.wait_idle()
    monkeypatch.undo()
    steered = tab.card("#steered")
    assert steered["state"] == "error" and steered["chunks"] >= 1, steered
    assert re.fullmatch(r"the model failed while generating; retry \(request id [\w.-]+\)", tab.alert()), tab.alert()
    assert "injected" not in tab.alert()
    page.locator("#send").click()  # the server recovered, and so does the page
    tab.wait_idle()
    assert tab.card("#steered")["state"] == "done" and tab.alert() == ""


def test_escape_stops_a_running_answer(tab: Tab, api: Served, monkeypatch) -> None:
    step = Engine.step

    def slow(self):  # a slow model: the answer is still streaming when Escape is pressed
        time.sleep(0.05)
        return step(self)

    page = tab.page
    page.locator("#prompt").fill("hello world")
    page.locator("#max-tokens").fill("200")
    monkeypatch.setattr(Engine, "step", slow)
    page.locator("#prompt").press("Control+Enter")
    page.locator("#steered[data-state=streaming] .answer:not(:empty)").wait_for(state="attached")
    page.keyboard.press("Escape")
    tab.wait_idle()
    steered = tab.card("#steered")
    assert steered["state"] == "stopped" and 1 <= steered["chunks"] < 150, steered
    assert page.locator("#status").inner_text() == "stopped" and tab.alert() == ""
    assert wait(lambda: api.backend.engine.running == 0), "the server should free the rows of a closed stream"
