"""The web chat page in a real headless browser (Debian's chromium driven by Playwright):
type a question, watch the answer stream in, continue the conversation, stop a generation.

Needs /usr/bin/chromium (`apt-get install -y chromium`) and the `playwright` package; the
browser Playwright would download is never used (`playwright install` is not needed)."""

from __future__ import annotations

import json
import os
import time

import httpx
import pytest
from serve_helpers import live_server

CHROMIUM = "/usr/bin/chromium"
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} missing: apt-get install -y chromium"),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def url(tiny_model_dir):
    with live_server(tiny_model_dir) as (base, _):
        yield base


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, url):
    page = browser.new_page(viewport={"width": 1100, "height": 760})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    # (a 4xx answer is logged by the browser as "Failed to load resource"; that is not a page bug)
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" and "Failed to load resource" not in m.text else None)
    page.goto(url + "/")
    yield page
    page.close()
    assert not errors, f"the page logged errors: {errors}"


def chat_bodies(page) -> list[dict]:
    """Record the JSON bodies the page POSTs to /v1/chat/completions."""
    bodies: list[dict] = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data)) if r.url.endswith("/v1/chat/completions") else None)
    return bodies


def ask(page, question: str) -> None:
    page.fill("#prompt", question)
    page.press("#prompt", "Enter")


WATCH_ANSWER = """() => {
  window.answerLengths = [];
  new MutationObserver(() => {
    const a = document.querySelector('.msg.assistant.streaming');
    if (a) window.answerLengths.push(a.textContent.length);
  }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
}"""


def test_streamed_answer_and_multi_turn(page, tmp_path):
    bodies = chat_bodies(page)
    sync_api.expect(page.locator("#model option")).to_have_text(["tiny"])
    page.fill("#max-tokens", "200")  # long enough to arrive in several paints (the page paints every 30 ms)
    page.locator("#temperature").fill("1")  # the tiny random model's greedy text is blank lines
    page.evaluate(WATCH_ANSWER)

    ask(page, "What is a camelid?")
    sync_api.expect(page.locator(".msg.assistant.streaming")).to_have_count(1)
    sync_api.expect(page.locator(".msg.assistant.streaming")).to_have_count(0, timeout=60_000)
    answer = page.locator(".msg.assistant").first
    first = answer.text_content()
    assert first.strip()
    lengths = page.evaluate("window.answerLengths")
    assert len(set(lengths)) >= 3 and lengths == sorted(lengths), f"the answer did not grow in pieces: {lengths}"
    sync_api.expect(page.locator("#status")).to_contain_text("200 tokens")
    page.screenshot(path=str(tmp_path / "chat.png"))

    ask(page, "Tell me more.")
    sync_api.expect(page.locator(".msg.assistant")).to_have_count(2, timeout=30_000)
    sync_api.expect(page.locator(".msg.assistant.streaming")).to_have_count(0, timeout=60_000)
    assert page.locator(".msg.user").all_inner_texts() == ["What is a camelid?", "Tell me more."]
    assert bodies[0]["stream"] is True and bodies[0]["temperature"] == 1 and bodies[0]["max_tokens"] == 200
    # the second request carries the whole conversation, the first answer included
    assert [m["role"] for m in bodies[1]["messages"]] == ["user", "assistant", "user"]
    assert bodies[1]["messages"][1]["content"] == first


def test_stop_button_ends_the_generation(page, url):
    page.fill("#max-tokens", "900")
    ask(page, "Talk for a long time.")
    stop = page.locator("#stop")
    sync_api.expect(stop).to_be_visible()
    page.wait_for_function("() => document.querySelector('.msg.assistant').textContent.length > 20", timeout=30_000)
    stop.click()
    sync_api.expect(page.locator(".msg.assistant .note")).to_have_text("stopped")
    sync_api.expect(page.locator("#send")).to_be_visible()
    deadline = time.monotonic() + 20
    while httpx.get(url + "/health").json()["active_requests"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(url + "/health").json()["active_requests"] == 0, "the stopped request still holds a slot"


def test_error_is_shown(page):
    page.fill("#max-tokens", "2000")  # past the tiny model's 1024-token context: the server answers 400
    ask(page, "hi")
    sync_api.expect(page.locator(".msg.error")).to_contain_text("context", timeout=30_000)
    sync_api.expect(page.locator("#send")).to_be_visible()


def test_json_toggle_asks_for_a_json_object(page):
    bodies = chat_bodies(page)
    page.fill("#max-tokens", "120")
    page.locator("#temperature").fill("1")
    page.check("#json-mode")
    ask(page, "Describe a llama as JSON.")
    sync_api.expect(page.locator(".msg.assistant.streaming")).to_have_count(0, timeout=60_000)
    assert bodies[0]["response_format"] == {"type": "json_object"}
    answer = page.locator(".msg.assistant").first.text_content()
    assert answer.startswith("{")  # constrained decoding: a JSON object (complete where it ended by itself)
    status = page.locator("#status").text_content()
    if "hit max tokens" not in status:
        assert isinstance(json.loads(answer), dict)
    # the choice is kept, and unchecking it sends no response_format
    page.reload()
    assert page.is_checked("#json-mode")
    bodies = chat_bodies(page)
    page.uncheck("#json-mode")
    ask(page, "And now in words?")
    sync_api.expect(page.locator(".msg.assistant.streaming")).to_have_count(0, timeout=60_000)
    assert "response_format" not in bodies[0]
