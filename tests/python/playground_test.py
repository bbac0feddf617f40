#!/usr/bin/env python3
"""Drives the web playground in headless Chromium (Debian's `chromium` and `chromedriver`,
through Selenium; nothing is downloaded): uploads an image, sends a prompt greedily with
adaptive speculation, waits for the answer, checks that it equals the expected text (the gRPC
API's answer to the same request), that the step trees were drawn with accepted nodes, and
that the target-only comparison finished; saves a screenshot. Exits non-zero on any failure.

    python3 tests/python/playground_test.py --url http://127.0.0.1:8000/ \
        --image examples/test/test_00000.png --prompt "Describe the image." \
        --max-tokens 32 --expected "..." --screenshot docs/playground.png
"""

import argparse
import os
import sys


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--expected", required=True)
    ap.add_argument("--screenshot", required=True)
    ap.add_argument("--api-key", default="")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--chromedriver", default="/usr/bin/chromedriver")
    args = ap.parse_args()

    # Selenium Manager must not fetch a browser or driver: both paths are given.
    os.environ["SE_OFFLINE"] = "true"
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    opts = Options()
    opts.binary_location = args.chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              "--window-size=1440,900", "--force-device-scale-factor=1"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(args.chromedriver), options=opts)
    try:
        driver.get(args.url)
        driver.find_element(By.ID, "image-input").send_keys(os.path.abspath(args.image))
        WebDriverWait(driver, 20).until(
            lambda d: d.find_element(By.ID, "preview").get_attribute("hidden") is None)
        Select(driver.find_element(By.ID, "mode")).select_by_value("adaptive")
        for field, value in (("temperature", "0"), ("max-tokens", str(args.max_tokens))):
            box = driver.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        if args.api_key:
            driver.find_element(By.ID, "api-key").send_keys(args.api_key)
        driver.find_element(By.ID, "prompt").send_keys(args.prompt)
        driver.find_element(By.ID, "send").click()
        status = lambda d: d.find_element(By.ID, "status").get_attribute("data-state")
        WebDriverWait(driver, 180).until(lambda d: status(d) in ("done", "error"))
        answer = driver.execute_script(
            "return document.querySelector('#chat .assistant:last-child .text').textContent")
        assert status(driver) == "done", answer
        assert answer == args.expected, (answer, args.expected)
        nodes = driver.find_elements(By.CSS_SELECTOR, "#steps .tree-node")
        accepted = driver.find_elements(By.CSS_SELECTOR, "#steps .tree-node.accepted")
        steps = driver.find_elements(By.CSS_SELECTOR, "#steps > li")
        assert steps and nodes and accepted, (len(steps), len(nodes), len(accepted))
        colored = driver.find_elements(By.CSS_SELECTOR, "#chat .assistant .text span[class^=step-]")
        assert colored, "tokens coloured by their step"
        WebDriverWait(driver, 180).until(
            lambda d: d.find_element(By.ID, "speedup").get_attribute("data-state") == "done")
        speedup = driver.find_element(By.ID, "speedup").text
        assert speedup.endswith("target-only)") and "x (" in speedup, speedup
        driver.save_screenshot(args.screenshot)
        print(f"playground ok: {len(steps)} steps, {len(nodes)} tree nodes "
              f"({len(accepted)} accepted), speedup {speedup}; screenshot {args.screenshot}")
    finally:
        driver.quit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
