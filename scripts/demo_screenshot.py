#!/usr/bin/env python3
"""Take the README's screenshot of the demo page (docs/img/demo.png).

Starts ``fanout demo`` with its bot on free loopback ports, opens the page
in Debian's headless chromium (the same browser and driver as
tests/test_browser.py), says hello from the page's chat box, sends a
rocket with its gift button, waits until bullet comments, gifts, the
rocket's receipt and the online count are on screen, and saves the window. Emoji need a colour emoji font (Debian: fonts-noto-color-emoji).

    .venv/bin/python scripts/demo_screenshot.py [--out docs/img/demo.png]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fanout._testbase import Proc  # noqa: E402

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars"]


MOMENT = """
const settled = (el, from, to) => el.getAnimations().every(
    a => a.currentTime >= from && a.currentTime <= to);
const cards = [...document.querySelectorAll('#gifts .gift')];
const boom = document.querySelector('#burst .boom');
const receipt = document.querySelector('#toasts .toast.receipt');
return fanoutDemo.online !== null
    && receipt !== null && settled(receipt, 300, 4500)
    && document.querySelectorAll('#danmaku .bullet').length >= 8
    && cards.length >= 3 && cards.every(c => settled(c, 450, 3500))
    && boom !== null && settled(boom, 600, 1600);
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "img" / "demo.png"))
    parser.add_argument("--size", default="1280,720", help="window width,height")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--chromedriver", default="/usr/bin/chromedriver")
    args = parser.parse_args()

    ports = [str(free_port()) for _ in range(4)]
    demo = Proc([sys.executable, "-m", "fanout", "demo", "--http-port", ports[0],
                 "--port", ports[1], "--ws-port", ports[2], "--admin-port", ports[3],
                 "--bot-rate", "4", "--bot-viewers", "7", "--user", "you"],
                "demo", env=os.environ.copy(), cwd=ROOT)
    try:
        url = demo.wait_line(r"fanout demo: open (http://\S+)", 30).group(1)
        with tempfile.TemporaryDirectory() as profile:
            options = webdriver.ChromeOptions()
            options.binary_location = args.chromium
            for flag in FLAGS + [f"--window-size={args.size}", f"--user-data-dir={profile}"]:
                options.add_argument(flag)
            driver = webdriver.Chrome(options=options,
                                      service=Service(executable_path=args.chromedriver))
            try:
                # The page's own size (a headless window's includes no chrome,
                # but not always what --window-size says).
                width, height = (int(v) for v in args.size.split(","))
                driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
                    "width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
                driver.get(url)
                wait = WebDriverWait(driver, 30, poll_frequency=0.1)
                wait.until(lambda d: d.execute_script(
                    "return window.fanoutDemo && fanoutDemo.status === 'connected'"))
                time.sleep(3)
                driver.find_element(By.ID, "text").send_keys("hello from the browser 👋",
                                                            Keys.ENTER)
                # A busy moment: comments flying, gift cards settled (none
                # mid-slide), a big gift bursting, the page's rocket receipt
                # shown, the online count shown. The rocket is sent again
                # whenever its receipt's toast (6 s) has gone.
                rocket = '#giftbar button[data-gift="rocket"]'
                receipt = "return document.querySelector('#toasts .toast.receipt')"
                WebDriverWait(driver, 120, poll_frequency=0.05).until(
                    lambda d: d.execute_script(MOMENT) or (
                        d.execute_script(receipt) is None
                        and d.find_element(By.CSS_SELECTOR, rocket).click()))
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                driver.save_screenshot(args.out)
            finally:
                driver.quit()
    finally:
        demo.stop(signal.SIGTERM)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
