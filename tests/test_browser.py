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
import sys
import time

import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from conftest import token
from demokit import ROOM, WAIT, CutProxy, start_demo  # noqa: F401  (a fixture)

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# The closed network makes chromium slow without the networking flags: it
# waits for the services it would call.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync",
                  # A container's small /dev/shm would crash the renderer.
                  "--disable-dev-shm-usage", "--window-size=1280,800"]


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


def page_state(driver) -> dict:
    return driver.execute_script(
        "const d = window.fanoutDemo; if (!d) return null;"
        "const row = m => [m.room, m.epoch, m.seq, m.kind, m.sender, m.text];"
        "return {status: d.status, error: d.error, online: d.online, user: d.user,"
        "        channel: d.channel, reconnects: d.reconnects, gaps: d.gaps,"
        "        messages: d.messages.map(row), pushes: d.pushes.map(row)};")


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


def test_gift_button_reaches_the_room_and_its_receipt_only_the_sender(start_demo, browser):
    demo = start_demo("--no-bot")
    browser.get(f"{demo.url}?user=ann")
    ann_tab = browser.current_window_handle
    assert connected(browser)["channel"] == "@ann"
    browser.switch_to.new_window("tab")
    browser.get(f"{demo.url}?user=bob")
    bob_tab = browser.current_window_handle
    connected(browser)

    browser.switch_to.window(ann_tab)
    browser.find_element(By.CSS_SELECTOR, '#giftbar button[data-gift="rocket"]').click()
    state = wait_page(browser, lambda s: s["messages"] and s["pushes"], "the gift and its receipt")
    assert [m[2:] for m in state["messages"]] == [
        [1, "gift", "ann", json.dumps({"gift": "rocket", "count": 1})]]
    [push] = state["pushes"]
    assert push[0] == "@ann" and push[2:5] == [1, "system", "gift-service"]
    assert json.loads(push[5]) == {"receipt": "gift", "gift": "rocket", "count": 1,
                                   "room": ROOM, "room_seq": 1}
    toast = browser.find_element(By.CSS_SELECTOR, "#toasts .toast.receipt")
    assert toast.get_attribute("data-kind") == "receipt"
    assert "Your Rocket reached the room (#1)" in toast.get_attribute("textContent")

    # bob's page: the gift in the room, no receipt; then a notice pushed to bob alone
    browser.switch_to.window(bob_tab)
    state = wait_page(browser, lambda s: s["messages"], "ann's gift")
    assert [m[2:5] for m in state["messages"]] == [[1, "gift", "ann"]]
    card = browser.find_element(By.CSS_SELECTOR, "#gifts .gift").get_attribute("textContent")
    assert "ann" in card and "Rocket" in card, card
    assert demo.push("bob", "the stream ends in 5 minutes", sender="host") == 1
    state = wait_page(browser, lambda s: s["pushes"], "the notice")
    assert [p[:1] + p[2:] for p in state["pushes"]] == [
        ["@bob", 1, "system", "host", "the stream ends in 5 minutes"]]
    assert browser.find_elements(By.CSS_SELECTOR, "#toasts .toast.receipt") == []
    notice = browser.find_element(By.CSS_SELECTOR, "#toasts .toast.system")
    assert "the stream ends in 5 minutes" in notice.get_attribute("textContent")
    browser.switch_to.window(ann_tab)
    assert len(page_state(browser)["pushes"]) == 1


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
    its viewers count in the online figure, and it welcomes the page's user
    on the user's channel."""
    demo = start_demo("--bot-rate", "20", "--bot-viewers", "3")
    browser.get(demo.url)
    connected(browser)
    state = wait_page(browser, lambda s: len({m[3] for m in s["messages"]}) == 2
                      and s["online"] == 4 and s["pushes"], "chat, a gift, 4 online, a welcome")
    seqs = [m[2] for m in state["messages"]]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert browser.find_elements(By.CSS_SELECTOR, "#danmaku .bullet")
    [welcome] = state["pushes"]
    assert welcome[0] == "@" + state["user"] and welcome[2:5] == [1, "system", ROOM]
    assert welcome[5].startswith(f"Welcome to #{ROOM}, {state['user']}!")
