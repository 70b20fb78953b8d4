"""The demo page in a real browser: Debian's chromium, headless, driven by
Selenium through Debian's chromedriver (both from apt: `make test` installs
them; nothing is downloaded here, the paths are given).

Each test starts `fanout demo` (an embedded node with its WebSocket port,
the page, the JavaScript SDK's browser build) on loopback, opens the page,
publishes through the node's admin API and reads what the page received
from ``window.fanoutDemo`` and its DOM.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from conftest import API_KEY, SECRET, token
from fanout._testbase import Proc

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# The closed network makes chromium slow without the networking flags: it
# waits for the services it would call.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync",
                  "--window-size=1280,800"]
ROOM = "lobby"
# A restart drains: the page is told to come back within the jitter, and the
# drain does not wait long for it to leave.
DEMO_ENV = {"FANOUT_SECRET": SECRET, "FANOUT_DRAIN_JITTER_MS": "200",
            "FANOUT_DRAIN_GRACE_MS": "2000", "FANOUT_PRESENCE_INTERVAL_MS": "500"}
WAIT = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Demo:
    """A `fanout demo` process on fixed loopback ports, so that a restart
    comes back where the page left it."""

    def __init__(self, tmp_path: Path, loop: str, *extra: str) -> None:
        self.http_port, self.port, self.ws_port, self.admin_port = (free_port() for _ in range(4))
        self.argv = [sys.executable, "-m", "fanout", "demo", "--loop", loop,
                     "--http-port", self.http_port, "--port", self.port,
                     "--ws-port", self.ws_port, "--admin-port", self.admin_port,
                     "--api-key", API_KEY, "--log-level", "INFO", *extra]
        self.tmp_path = tmp_path
        self.proc: Proc | None = None
        self.starts = 0
        self.start()

    def start(self) -> None:
        self.starts += 1
        self.proc = Proc(self.argv, "demo", env={**os.environ, **DEMO_ENV},
                         log_path=self.tmp_path / f"demo-{self.starts}.log")
        self.url = self.proc.wait_line(r"fanout demo: open (http://\S+)", WAIT).group(1)

    def stop(self) -> int:
        return self.proc.stop(signal.SIGTERM, timeout=15)

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}/ws"

    def publish(self, kind: str, payload: str, sender: str = "tester") -> int:
        body = json.dumps({"room": ROOM, "kind": kind, "payload": payload,
                           "sender": sender}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.admin_port}/v1/publish", data=body, method="POST",
            headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())["seq"]

    def log(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:]
                         for p in sorted(self.tmp_path.glob("demo-*.log")))


class CutProxy:
    """A TCP proxy on 127.0.0.1 in front of the node's WebSocket port whose
    connections the test can cut: ``cut()`` resets every connection and
    refuses new ones until ``restore()``."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.accepted = 0
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self.accepted += 1
                self._socks += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def cut(self) -> None:
        # shutdown first: a close alone leaves the thread blocked in accept()
        # holding the socket, which would go on accepting.
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            # Linger 0: a reset, as when a network path dies; SHUT_RD wakes
            # the pump blocked in recv(), which holds the socket open.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            try:
                s.shutdown(socket.SHUT_RD)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.cut()


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # The driver's path given: Selenium Manager is never asked (no download).
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(WAIT)
    yield driver
    try:
        for entry in driver.get_log("browser"):
            sys.stderr.write(f"[chromium console] {entry['level']} {entry['message']}\n")
    finally:
        driver.quit()


@pytest.fixture
def start_demo(tmp_path, node_loop, request):
    demos: list[Demo] = []

    def start(*extra: str) -> Demo:
        demo = Demo(tmp_path, node_loop, *extra)
        demos.append(demo)
        return demo

    yield start
    for demo in demos:
        demo.stop()
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        for demo in demos:
            sys.stderr.write(f"--- demo log ---\n{demo.log()}\n")


def page_state(driver) -> dict:
    return driver.execute_script(
        "const d = window.fanoutDemo; if (!d) return null;"
        "return {status: d.status, error: d.error, online: d.online, user: d.user,"
        "        reconnects: d.reconnects, gaps: d.gaps,"
        "        messages: d.messages.map(m => [m.room, m.epoch, m.seq, m.kind, m.sender, m.text])};")


def wait_page(driver, predicate, what: str, timeout: float = WAIT) -> dict:
    """Poll the page's state until ``predicate(state)``; the state."""
    try:
        WebDriverWait(driver, timeout, poll_frequency=0.05).until(
            lambda d: (s := page_state(d)) is not None and predicate(s))
    except TimeoutException:
        raise AssertionError(f"page: {what} not within {timeout} s; "
                             f"state {page_state(driver)}") from None
    return page_state(driver)


def connected(driver) -> dict:
    return wait_page(driver, lambda s: s["status"] == "connected", "connected")


def texts(state: dict) -> list[str]:
    return [m[5] for m in state["messages"]]


def test_page_shows_gift_and_chat_in_order_and_the_online_count(start_demo, browser):
    demo = start_demo("--no-bot")
    browser.get(demo.url)
    state = connected(browser)
    assert state["error"] is None and state["user"].startswith("viewer-")

    gift = json.dumps({"gift": "rocket", "count": 3})
    first = demo.publish("gift", gift, sender="gift-svc")
    second = demo.publish("chat", "hello from the admin API", sender="host")
    assert second == first + 1
    state = wait_page(browser, lambda s: len(s["messages"]) >= 2, "two messages")
    assert [m[2:] for m in state["messages"]] == [
        [first, "gift", "gift-svc", gift], [second, "chat", "host", "hello from the admin API"]]
    assert {m[0] for m in state["messages"]} == {ROOM}
    # What a person sees: the gift's card, the chat flying as a bullet comment,
    # both lines in the chat list with their seqs.
    # (textContent: they are mid-animation, maybe still outside the stage.)
    card = browser.find_element(By.CSS_SELECTOR, "#gifts .gift").get_attribute("textContent")
    assert "Rocket" in card and "×3" in card and "gift-svc" in card, card
    bullets = [b.get_attribute("textContent")
               for b in browser.find_elements(By.CSS_SELECTOR, "#danmaku .bullet")]
    assert any("hello from the admin API" in b for b in bullets), bullets
    lines = browser.find_elements(By.CSS_SELECTOR, "#log li[data-seq]")
    assert [(li.get_attribute("data-seq"), li.get_attribute("data-kind")) for li in lines] == [
        (str(first), "gift"), (str(second), "chat")]

    # The online count comes from the node's Presence: this page alone.
    state = wait_page(browser, lambda s: s["online"] == 1, "online count 1")
    online = browser.find_element(By.ID, "online")
    assert online.get_attribute("data-online") == "1" and "1 online" in online.text

    # The chat box: typed, sent over the WebSocket, back from the node.
    box = browser.find_element(By.ID, "text")
    box.send_keys("typed in the browser", Keys.ENTER)
    state = wait_page(browser, lambda s: len(s["messages"]) >= 3, "own chat")
    assert state["messages"][2][2:] == [second + 1, "chat", state["user"], "typed in the browser"]


def test_page_resumes_across_a_node_restart(start_demo, browser):
    demo = start_demo("--no-bot")
    browser.get(demo.url)
    connected(browser)
    before = [f"before {i}" for i in range(3)]
    for text in before:
        demo.publish("chat", text)
    wait_page(browser, lambda s: len(s["messages"]) == 3, "the first three")

    assert demo.stop() == 0
    wait_page(browser, lambda s: s["status"] == "reconnecting", "reconnecting")
    demo.start()                                   # the same ports
    connected(browser)
    after = [f"after {i}" for i in range(3)]
    for text in after:
        demo.publish("chat", text)
    state = wait_page(browser, lambda s: len(s["messages"]) >= 6, "all six")
    time.sleep(0.5)                                # a duplicate would arrive by now
    state = page_state(browser)
    assert texts(state) == before + after
    # The restarted node began a new history of the room (a new epoch): the
    # page resumed into it from its seq 1, within each epoch gapless.
    epochs = [m[1] for m in state["messages"]]
    assert epochs[0] == epochs[2] and epochs[3] == epochs[5] and epochs[0] != epochs[3]
    assert [m[2] for m in state["messages"]] == [1, 2, 3, 1, 2, 3]
    assert state["gaps"] == [] and state["error"] is None


def test_page_resumes_after_the_socket_is_cut(start_demo, browser):
    demo = start_demo("--no-bot")
    proxy = CutProxy(demo.ws_port)
    try:
        browser.get(f"{demo.url}?ws=ws://127.0.0.1:{proxy.port}/ws")
        connected(browser)
        published = []

        def publish(label: str, count: int) -> None:
            for i in range(count):
                text = f"{label} {i}"
                kind = "gift" if i == 1 else "chat"
                published.append((demo.publish(kind, text), kind, text))

        publish("before", 3)
        wait_page(browser, lambda s: len(s["messages"]) == 3, "the first three")
        proxy.cut()
        wait_page(browser, lambda s: s["status"] == "reconnecting", "reconnecting")
        publish("while", 3)                        # the node keeps them for the resume
        time.sleep(0.3)
        assert len(page_state(browser)["messages"]) == 3
        proxy.restore()
        connected(browser)
        publish("after", 3)
        wait_page(browser, lambda s: len(s["messages"]) >= 9, "all nine")
        time.sleep(0.5)                            # a duplicate would arrive by now
        state = page_state(browser)
        got = [(m[2], m[3], m[5]) for m in state["messages"]]
        assert got == published
        assert [seq for seq, _, _ in got] == list(range(1, 10))
        assert len({m[1] for m in state["messages"]}) == 1     # one epoch: a resume
        assert state["gaps"] == [] and proxy.accepted >= 2
    finally:
        proxy.close()


@pytest.mark.parametrize("refused", ["wrong-secret", "expired"])
def test_refused_token_shows_a_clear_error(start_demo, browser, refused):
    demo = start_demo("--no-bot")
    if refused == "wrong-secret":
        bad, reason = token("mallory", secret="not-the-node-secret-0123456789abcdef"), "AUTH_INVALID"
    else:
        bad, reason = token("mallory", ttl=-60), "AUTH_EXPIRED"
    browser.get(f"{demo.url}?token={bad}&user=mallory")
    state = wait_page(browser, lambda s: s["status"] == "error", "an error")
    assert state["error"]["name"] == reason, state["error"]
    assert state["error"]["message"]
    status = browser.find_element(By.ID, "status")
    assert status.get_attribute("data-status") == "error" and reason in status.text
    # A refused token is not retried: the page stays in its error.
    time.sleep(1.0)
    state = page_state(browser)
    assert state["status"] == "error" and state["messages"] == []
    assert browser.find_element(By.ID, "text").get_attribute("disabled") is not None


def test_fanout_demo_with_its_bot(start_demo, browser):
    """`fanout demo` as a person runs it: the bot's chat and gifts arrive,
    and its viewers count in the online figure."""
    demo = start_demo("--bot-rate", "20", "--bot-viewers", "3")
    browser.get(demo.url)
    connected(browser)
    state = wait_page(browser, lambda s: len({m[3] for m in s["messages"]}) == 2
                      and s["online"] == 4, "chat, a gift and 4 online")
    seqs = [m[2] for m in state["messages"]]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert browser.find_elements(By.CSS_SELECTOR, "#danmaku .bullet")
