"""Browsers: the chat page at `/` in Debian's Chromium (driven by Playwright), a page on another origin talking
to the edge through CORS, and the stream tickets an EventSource opens, all on a mesh of their own.

The mesh answers slowly enough (20 ms a token, answers as long as max_tokens) for Stop and a dropped connection
to land mid-answer; it has NATS of its own so that no other mesh's workers run its turns. A TCP proxy in front
of the edge stands in for the network: cutting it drops every connection the page has.

Each flow saves a screenshot under test-artifacts/browser/ (CHATTERBOT_TEST_ARTIFACTS moves it).
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis
from playwright.sync_api import Browser, Page, Request, Route, expect, sync_playwright
from prometheus_client.parser import text_string_to_metric_families

from edge.cors import LOOPBACK_ORIGINS
from edge.tickets import SECRET_REDIS_KEY, StreamTickets
from ops.launcher import Mesh
from tests.clients import REPO_ROOT, create_key, new_user
from tests.meshes import API_KEY, own_mesh
from tests.test_openai_api import SIM_MODEL, sdk

CHROMIUM = Path(os.environ.get("CHATTERBOT_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = Path(os.environ.get("CHATTERBOT_TEST_ARTIFACTS", REPO_ROOT / "test-artifacts")) / "browser"
XSS_IMG = "<img src=x onerror=alert(1)>"
XSS_SCRIPT = "<script>alert(2)</script>"

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM}: `apt-get install chromium` (.ci/run does)"
)
expect.set_options(timeout=30_000)


# --- the network, the mesh, the browser ---------------------------------------------------------------------


class CuttableProxy:
    """A TCP proxy to the edge whose connections can all be cut, and new ones refused, as a lost network would."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.down = threading.Event()
        self.live: set[socket.socket] = set()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.down.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.live |= {client, upstream}
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for s in (source, sink):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Drop every connection and refuse new ones until `restore()`."""
        self.down.set()
        with self.lock:
            live, self.live = self.live, set()
        for s in live:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def restore(self) -> None:
        self.down.clear()

    def close(self) -> None:
        self.cut()
        self.listener.close()


@pytest.fixture(scope="module")
def browser_mesh(servers, tmp_path_factory) -> Iterator[Mesh]:
    with own_mesh(
        servers,
        tmp_path_factory,
        "browser-mesh",
        own_nats=True,
        cors_origins=list(LOOPBACK_ORIGINS),
        sim_itl_ms=20,
        sim_itl_at_max_ms=20,
        sim_mean_output_tokens=10_000,
    ) as mesh:
        yield mesh


@pytest.fixture(scope="module")
def network(browser_mesh: Mesh) -> Iterator[CuttableProxy]:
    url = httpx.URL(browser_mesh.edge_url)
    proxy = CuttableProxy((url.host, url.port or 80))
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM))
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def api(browser_mesh: Mesh) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=browser_mesh.edge_url, headers={"X-API-Key": API_KEY}, timeout=30) as client:
        yield client


class Dialogs(list[str]):
    """Every alert, confirm or prompt a page opened (none should ever open)."""


@pytest.fixture
def page(browser: Browser, network: CuttableProxy) -> Iterator[Page]:
    """A desktop-sized page of a fresh browser context, on the edge through the proxy; `page.dialogs`."""
    context = browser.new_context(base_url=network.url, viewport={"width": 1280, "height": 800})
    page = context.new_page()
    dialogs = Dialogs()

    def on_dialog(dialog) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", on_dialog)
    page.dialogs = dialogs  # type: ignore[attr-defined]
    try:
        yield page
    finally:
        context.close()


def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def wait_for(condition: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


# --- what a person does -------------------------------------------------------------------------------------


def sign_in(page: Page, key: str, user: str | None = None, *, path: str = "/") -> None:
    page.goto(path)
    page.fill("#key-input", key)
    page.click("#signin-button")
    expect(page.locator("#app")).to_be_visible()
    if user is not None:
        page.fill("#user-id", user)
        page.click("#user-apply")
        expect(page.locator("#message-input")).to_be_enabled()


def set_longest_answer(page: Page, tokens: int) -> None:
    page.click(".settings summary")
    page.fill("#max-tokens", str(tokens))
    page.locator("#max-tokens").dispatch_event("change")
    page.click(".settings summary")


def send(page: Page, text: str) -> None:
    page.fill("#message-input", text)
    page.press("#message-input", "Enter")


def last_answer(page: Page):
    return page.locator(".message.assistant").last


def wait_answered(page: Page) -> str:
    answer = last_answer(page)
    expect(answer).not_to_have_class(re.compile(r"\bstreaming\b"))
    return answer.locator(".content").inner_text()


def current_conversation(page: Page) -> str:
    return page.evaluate("decodeURIComponent(location.hash.slice(4))")


def stored_messages(api: httpx.Client, user: str, conversation_id: str) -> list[dict]:
    r = api.get(f"/history/{user}", params={"conversation_id": conversation_id, "limit": 500})
    assert r.status_code == 200, r.text
    return r.json()["messages"]


def answering(status: int, detail: str, headers: dict[str, str]) -> Callable[[Route], None]:
    """A route handler that answers with a problem response of its own."""

    def handler(route: Route) -> None:
        body = orjson.dumps({"title": "Problem", "status": status, "detail": detail})
        route.fulfill(
            status=status, headers={**headers, "Content-Type": "application/problem+json"}, body=body
        )

    return handler


def words(text: str) -> str:
    return " ".join(text.split())


def engine_metric(mesh: Mesh, name: str) -> float:
    text = httpx.get(mesh.up_info()["metrics"]["inference"], timeout=5).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    )


# --- the chat page ------------------------------------------------------------------------------------------


def test_a_wrong_key_says_so_and_a_user_key_acts_for_its_own_user(page: Page, browser_mesh: Mesh):
    response = page.goto("/")
    assert response is not None and response.ok
    # The page may run only its own scripts and talk only to its own edge.
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy
    page.fill("#key-input", "cb_" + "x" * 43)
    page.click("#signin-button")
    expect(page.locator("#signin-error")).to_contain_text("not accepted")
    screenshot(page, "01-wrong-key")

    user = new_user()
    key = create_key(browser_mesh, "--user", user).key
    page.fill("#key-input", key)
    page.click("#signin-button")
    expect(page.locator("#app")).to_be_visible()
    expect(page.locator("#user-id")).to_have_value(user)
    expect(page.locator("#user-id")).to_have_attribute("readonly", "")
    expect(page.locator("#key-kind")).to_have_text("user key")
    # The key is in this tab's sessionStorage, and nowhere in the address.
    assert page.evaluate("sessionStorage.getItem('chatterbot.key')") == key
    assert key not in page.url
    screenshot(page, "02-user-key")


def test_an_answer_streams_in_and_is_there_after_a_reload(page: Page, api: httpx.Client):
    user = new_user()
    models = [m["id"] for m in api.get("/v1/models").json()["data"]]
    sign_in(page, API_KEY, user)
    expect(page.locator("#model option")).to_have_count(len(models))
    assert page.locator("#model").input_value() in models
    set_longest_answer(page, 60)

    send(page, "Hello there")
    expect(page.locator(".message.user .content")).to_have_text("Hello there")
    answer = wait_answered(page)
    conversation_id = current_conversation(page)
    stored = stored_messages(api, user, conversation_id)
    assert [m["role"] for m in stored] == ["user", "assistant"]
    assert words(answer) == words(stored[1]["content"])
    expect(page.locator(".conversation.current .title")).to_have_text("Hello there")
    screenshot(page, "03-answered")

    page.reload()
    expect(page.locator(".message")).to_have_count(2)
    assert words(last_answer(page).locator(".content").inner_text()) == words(stored[1]["content"])
    expect(page.locator("#chat-title")).to_have_text("Hello there")
    screenshot(page, "04-after-reload")


def test_a_long_conversation_pages_in_as_you_scroll_up(page: Page, api: httpx.Client):
    user = new_user()
    conversation_id = api.post("/conversations", json={"user_id": user, "title": "Long one"}).json()[
        "conversation_id"
    ]
    for n in range(12):
        r = api.post(
            "/chat",
            json={
                "message": f"turn {n}",
                "user_id": user,
                "conversation_id": conversation_id,
                "max_tokens": 10,
            },
        )
        assert r.status_code == 200, r.text
    sign_in(page, API_KEY, user, path=f"/#/c/{conversation_id}")
    expect(page.locator(".message")).to_have_count(20)  # the newest page
    page.locator("#messages").evaluate("element => { element.scrollTop = 0 }")
    expect(page.locator(".message")).to_have_count(24)
    expect(page.locator(".message").first.locator(".content")).to_have_text("turn 0")
    screenshot(page, "05-history-paged")


def test_conversations_are_renamed_and_deleted(page: Page, api: httpx.Client):
    user = new_user()
    keep, drop = (
        api.post("/conversations", json={"user_id": user, "title": title}).json()["conversation_id"]
        for title in ("Keep me", "Drop me")
    )
    sign_in(page, API_KEY, user)
    expect(page.locator(".conversation")).to_have_count(2)

    kept = page.locator(f".conversation[data-id='{keep}']")
    kept.locator(".rename-button").click()
    page.fill(".rename input", "Trip to Lisbon")
    page.press(".rename input", "Enter")
    expect(kept.locator(".title")).to_have_text("Trip to Lisbon")

    page.locator(f".conversation[data-id='{drop}'] .delete-button").click()
    screenshot(page, "06-confirm-delete")
    page.locator(f".conversation[data-id='{drop}'] .danger").click()
    expect(page.locator(".conversation")).to_have_count(1)

    listed = api.get(f"/conversations/{user}").json()["conversations"]
    assert [(c["conversation_id"], c["title"]) for c in listed] == [(keep, "Trip to Lisbon")]
    screenshot(page, "07-renamed-and-deleted")


def test_stop_cancels_the_generation_in_the_engine(page: Page, api: httpx.Client, browser_mesh: Mesh):
    assert wait_for(lambda: engine_metric(browser_mesh, "chatterbot_engine_running_sequences") == 0)
    aborted = engine_metric(browser_mesh, "chatterbot_engine_aborted_requests_total")
    sign_in(page, API_KEY, new_user())
    set_longest_answer(page, 1000)  # about 20 s
    send(page, "Talk for a long time")
    expect(last_answer(page).locator(".content")).to_contain_text("simulated")
    assert wait_for(lambda: engine_metric(browser_mesh, "chatterbot_engine_running_sequences") == 1)

    page.click("#stop")
    expect(last_answer(page).locator(".meta")).to_have_text("Stopped")
    expect(page.locator("#send")).to_be_visible()
    assert wait_for(lambda: engine_metric(browser_mesh, "chatterbot_engine_running_sequences") == 0)
    assert wait_for(
        lambda: engine_metric(browser_mesh, "chatterbot_engine_aborted_requests_total") == aborted + 1
    )
    correlation_id = last_answer(page).get_attribute("data-correlation-id")
    assert wait_for(lambda: api.get(f"/check-response/{correlation_id}").json().get("status") == "failed")
    screenshot(page, "08-stopped")


def test_a_lost_connection_resumes_the_answer_with_nothing_repeated_or_missing(
    page: Page, api: httpx.Client, network: CuttableProxy
):
    user = new_user()
    streams: list[str] = []
    page.on("request", lambda r: streams.append(r.url) if "/stream/" in r.url and r.method == "GET" else None)
    sign_in(page, API_KEY, user)
    set_longest_answer(page, 300)  # about 6 s
    send(page, "Tell me a story")
    expect(last_answer(page).locator(".content")).to_contain_text("tokens]")

    page.context.set_offline(True)
    network.cut()
    expect(page.locator("#stream-status")).to_be_visible()
    screenshot(page, "09-connection-lost")
    network.restore()
    page.context.set_offline(False)

    answer = wait_answered(page)
    expect(page.locator("#stream-status")).to_be_hidden()
    stored = stored_messages(api, user, current_conversation(page))
    assert words(answer) == words(stored[-1]["content"])
    # It came back through a fresh ticket, after the last event it had seen.
    assert len(streams) >= 2 and "last_event_id=" in streams[-1], streams
    screenshot(page, "10-resumed")


def test_markup_in_messages_and_answers_shows_as_text_and_runs_nothing(page: Page, api: httpx.Client):
    user = new_user()
    sign_in(page, API_KEY, user)
    set_longest_answer(page, 20)
    message = f"{XSS_IMG} and {XSS_SCRIPT}"
    send(page, message)
    wait_answered(page)
    expect(page.locator(".message.user .content")).to_have_text(message)
    conversation_id = current_conversation(page)

    # An answer with the same markup, and Markdown that must render: the history as the page reads it.
    answer = f"Here:\n\n- one\n- two\n\n```python\nprint('hi')\n```\n\n{XSS_IMG}\n\n{XSS_SCRIPT}\n\n[x](javascript:alert(3))"

    def with_hostile_answer(route: Route, request: Request) -> None:
        response = route.fetch()
        body = response.json()
        for m in body["messages"]:
            if m["role"] == "assistant":
                m["content"] = answer
        route.fulfill(response=response, body=orjson.dumps(body))

    page.route(re.compile(r".*/history/.*"), with_hostile_answer)
    page.reload()
    rendered = last_answer(page).locator(".content")
    expect(rendered.locator("pre code")).to_have_text("print('hi')")
    expect(rendered.locator("li")).to_have_count(2)
    expect(rendered).to_contain_text(XSS_IMG)
    expect(rendered).to_contain_text(XSS_SCRIPT)
    assert page.locator("#message-list img, #message-list script, #message-list [onerror]").count() == 0
    assert page.locator("#message-list a[href^='javascript']").count() == 0
    assert page.dialogs == []  # type: ignore[attr-defined]
    assert api.get(f"/conversations/{user}").json()["conversations"][0]["conversation_id"] == conversation_id
    screenshot(page, "11-markup-as-text")


def test_a_tool_turn_shows_its_calls_and_their_results_apart_from_the_messages(
    page: Page, api: httpx.Client, browser_mesh: Mesh, browser: Browser, network: CuttableProxy
):
    user = new_user()
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius"]}},
                "required": ["city", "unit"],
            },
        },
    }
    # An agent's loop through the OpenAI API: the question, the call the model makes, the tool's result.
    client = sdk(browser_mesh)
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Lisbon?"}]
    asked = client.chat.completions.create(
        model=SIM_MODEL,
        messages=messages,
        tools=[weather],
        tool_choice="required",
        user=user,
        max_completion_tokens=200,
    )
    [call] = asked.choices[0].message.tool_calls or []
    result = json.dumps({"sky": "sunny", "note": XSS_IMG})
    messages += [asked.choices[0].message, {"role": "tool", "tool_call_id": call.id, "content": result}]
    answered = client.chat.completions.create(
        model=SIM_MODEL, messages=messages, tools=[weather], user=user, max_completion_tokens=20
    )
    # One conversation: the tool turn continued the one the question opened.
    [conversation] = api.get(f"/conversations/{user}").json()["conversations"]
    conversation_id = conversation["conversation_id"]
    assert [m["role"] for m in stored_messages(api, user, conversation_id)] == [
        "user",
        "assistant",
        "tool",
        "assistant",
    ]

    sign_in(page, API_KEY, user, path=f"/#/c/{conversation_id}")
    expect(page.locator(".message")).to_have_count(4)
    asking = page.locator(".message.assistant.tool-calls")
    expect(asking.locator(".content")).to_be_hidden()  # no text of its own: only the call shows
    shown_call = asking.locator(".tool-call")
    expect(shown_call.locator(".tool-label")).to_have_text("Called")
    expect(shown_call.locator(".tool-name")).to_have_text("get_weather")
    expect(shown_call.locator(".tool-id")).to_have_text(call.id)
    arguments = json.loads(call.function.arguments)
    assert shown_call.locator("pre code").inner_text() == json.dumps(arguments, indent=2, ensure_ascii=False)

    shown_result = page.locator(".message.tool .tool-result")
    expect(shown_result.locator(".tool-label")).to_have_text("Result of")
    expect(shown_result.locator(".tool-name")).to_have_text("get_weather")
    expect(shown_result.locator(".tool-id")).to_have_text(call.id)
    expect(shown_result.locator("pre code")).to_have_text(json.dumps(json.loads(result), indent=2))
    assert words(last_answer(page).locator(".content").inner_text()) == words(
        answered.choices[0].message.content or ""
    )

    # Calls and results look unlike each other and unlike the messages around them.
    background = "element => getComputedStyle(element).backgroundColor"
    looks = {
        page.locator(".tool-call .tool-head").first.evaluate(background),
        page.locator(".tool-result .tool-head").first.evaluate(background),
        page.locator(".message.user .content").evaluate(background),
    }
    assert len(looks) == 3, looks
    assert page.locator("#message-list img").count() == 0 and page.dialogs == []  # type: ignore[attr-defined]
    assert page.evaluate("document.scrollingElement.scrollWidth <= window.innerWidth")
    screenshot(page, "17-tool-turn")

    # On a phone, in the dark, nothing runs off the side either.
    phone = browser.new_context(
        base_url=network.url, viewport={"width": 390, "height": 844}, color_scheme="dark"
    )
    try:
        small = phone.new_page()
        sign_in(small, API_KEY, user, path=f"/#/c/{conversation_id}")
        expect(small.locator(".tool-block")).to_have_count(2)
        assert small.evaluate("document.scrollingElement.scrollWidth <= window.innerWidth")
        screenshot(small, "18-tool-turn-phone-dark")
    finally:
        phone.close()


def test_a_rate_limited_or_failing_send_says_what_happened(page: Page, browser_mesh: Mesh):
    user = new_user()
    key = create_key(browser_mesh, "--user", user, "--limit", "/stream-chat=1/minute").key
    sign_in(page, key)
    set_longest_answer(page, 20)
    send(page, "first")
    wait_answered(page)
    send(page, "second")
    expect(page.locator("#notice")).to_contain_text(re.compile(r"Too many requests.*Try again in \d+ s"))
    expect(page.locator("#message-input")).to_have_value("second")  # given back, to send later
    screenshot(page, "12-rate-limited")

    for status, shown in ((503, "unavailable right now"), (500, "failed to answer (500)")):
        page.route("**/stream-chat", answering(status, "the engine is away", {"Retry-After": "3"}))
        page.click("#send")
        expect(page.locator("#notice")).to_contain_text(shown)
        page.unroute("**/stream-chat")
    screenshot(page, "13-server-error")


@pytest.mark.parametrize("scheme", ["light", "dark"])
@pytest.mark.parametrize(("size", "viewport"), [("phone", (390, 844)), ("desktop", (1280, 800))])
def test_the_page_fits_phones_and_desktops_in_light_and_dark(
    browser: Browser,
    network: CuttableProxy,
    api: httpx.Client,
    scheme: str,
    size: str,
    viewport: tuple[int, int],
):
    user = new_user()
    conversation_id = api.post("/conversations", json={"user_id": user, "title": "Markdown"}).json()[
        "conversation_id"
    ]
    api.post(
        "/chat",
        json={
            "message": "Show me a list and some code",
            "user_id": user,
            "conversation_id": conversation_id,
            "max_tokens": 60,
        },
    )
    width, height = viewport
    context = browser.new_context(
        base_url=network.url, viewport={"width": width, "height": height}, color_scheme=scheme
    )
    try:
        page = context.new_page()
        sign_in(page, API_KEY, user, path=f"/#/c/{conversation_id}")
        expect(page.locator(".message")).to_have_count(2)
        # Nothing runs off the side, and the composer is on screen.
        assert page.evaluate("document.scrollingElement.scrollWidth <= window.innerWidth")
        box = page.locator("#message-input").bounding_box()
        assert box is not None and box["y"] + box["height"] <= height and box["x"] >= 0
        screenshot(page, f"14-{size}-{scheme}")
        if size == "phone":
            page.click("#open-sidebar")
            expect(page.locator("#sidebar")).to_have_css("transform", "none")  # slid all the way in
            expect(page.locator(".conversation")).to_be_in_viewport()
            screenshot(page, f"15-{size}-{scheme}-drawer")
    finally:
        context.close()


# --- a page on another origin -------------------------------------------------------------------------------

CROSS_ORIGIN_PAGE = """<!doctype html>
<meta charset="utf-8">
<title>Another origin</title>
<pre id="log" style="white-space: pre-wrap"></pre>
<script>
const params = new URLSearchParams(location.hash.slice(1));
const edge = params.get("edge"), key = params.get("key"), user = params.get("user");
const log = (line) => (document.getElementById("log").textContent += line + "\\n");
const headers = { "X-API-Key": key, "Content-Type": "application/json" };
async function main() {
  const queued = await (await fetch(edge + "/async-chat", {
    method: "POST", headers, body: JSON.stringify({ message: "async hello", user_id: user, max_tokens: 12 }),
  })).json();
  let result;
  do {
    await new Promise((r) => setTimeout(r, 100));
    result = await (await fetch(edge + queued.check_endpoint, { headers })).json();
  } while (result.status === "pending");
  log("async: " + JSON.stringify(result));
  const streaming = await (await fetch(edge + "/stream-chat", {
    method: "POST", headers, body: JSON.stringify({ message: "stream hello", user_id: user, max_tokens: 12 }),
  })).json();
  const source = new EventSource(edge + streaming.stream_endpoint);
  let text = "";
  source.onmessage = (event) => {
    if (event.data === "[DONE]") {
      source.close();
      log("stream: " + JSON.stringify({ correlation_id: streaming.correlation_id, text }));
      log("done");
      return;
    }
    text += JSON.parse(event.data).token;
  };
  source.onerror = () => log("stream error");
}
main().catch((error) => log("failed: " + error));
</script>
"""


@pytest.fixture
def other_origin(tmp_path) -> Iterator[str]:
    """A plain static server on another port: another origin."""
    (tmp_path / "index.html").write_text(CROSS_ORIGIN_PAGE)
    handler = lambda *args: http.server.SimpleHTTPRequestHandler(*args, directory=str(tmp_path))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_page_on_another_origin_chats_through_cors(
    browser: Browser, browser_mesh: Mesh, api: httpx.Client, other_origin: str
):
    user = new_user()
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(f"{other_origin}/#edge={browser_mesh.edge_url}&key={API_KEY}&user={user}")
        expect(page.locator("#log")).to_contain_text("done")
        lines = dict(line.split(": ", 1) for line in page.inner_text("#log").splitlines() if ": " in line)
        assert "failed" not in lines and "stream error" not in page.inner_text("#log")
        async_answer = orjson.loads(lines["async"])
        streamed = orjson.loads(lines["stream"])
        done = api.get(f"/check-response/{streamed['correlation_id']}").json()
        assert async_answer["response"] and streamed["text"] == done["response"]
        screenshot(page, "16-other-origin")
    finally:
        context.close()


# --- stream tickets -----------------------------------------------------------------------------------------


def test_a_ticket_opens_its_own_stream_and_only_until_it_expires(
    browser_mesh: Mesh, api: httpx.Client, valkey: redis.Redis
):
    user = new_user()
    body = {"message": "Hello", "user_id": user, "max_tokens": 12}
    first, second = (api.post("/stream-chat", json=body).json() for _ in range(2))
    with httpx.Client(base_url=browser_mesh.edge_url, timeout=30) as keyless:
        assert keyless.get(f"/stream/{first['correlation_id']}").status_code == 401  # neither key nor ticket
        with keyless.stream("GET", first["stream_endpoint"]) as r:
            assert r.status_code == 200
            data = [line[5:].strip() for line in r.iter_lines() if line.startswith("data:")]
        assert data[-1] == "[DONE]"
        text = "".join(orjson.loads(d)["token"] for d in data[:-1])
        assert text == api.get(f"/check-response/{first['correlation_id']}").json()["response"]

        # The ticket of one stream opens no other.
        ticket = first["stream_endpoint"].split("ticket=", 1)[1]
        assert (
            keyless.get(f"/stream/{second['correlation_id']}", params={"ticket": ticket}).status_code == 401
        )
        # The same ticket past its expiry, signed here with the edges' shared secret as an edge would sign it.
        key_id = api.get("/whoami").json()["key_id"]
        expired = StreamTickets(valkey.get(SECRET_REDIS_KEY), 300, clock=lambda: time.time() - 301).issue(
            first["correlation_id"], key_id
        )
        r = keyless.get(f"/stream/{first['correlation_id']}", params={"ticket": expired})
        assert r.status_code == 401 and "expired" in r.json()["detail"]

        # A new ticket, asked for with the key, resumes after the last event seen.
        renewed = api.post(f"/stream/{first['correlation_id']}/ticket").json()
        assert renewed["job_status"] == "succeeded"
        with keyless.stream("GET", renewed["stream_endpoint"] + "&last_event_id=3") as r:
            assert r.status_code == 200
            ids = [line[3:].strip() for line in r.iter_lines() if line.startswith("id:")]
        assert ids[0] == "4"
