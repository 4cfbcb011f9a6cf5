"""The playground page (GET /) in a real browser: Debian's headless Chromium driven by Selenium.

The test types a prompt, sends it to two adapters, waits for both streamed answers and checks
that they differ and are what the API itself answers. `make test` installs chromium and
chromium-driver (the Makefile's `browser` step). LORASERVE_PLAYGROUND_SCREENSHOT=<png> saves
a screenshot of the page with both answers (docs/playground.png is made so).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import openai
import pytest

from loraserve.auth import key_entry_toml
from tests.helpers import ServerThread, free_port
from tests.http.test_errors import ACME

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian's chromium and chromium-driver (`make browser` installs them)",
)
PROMPT = "o rato roeu a roupa"
MAX_TOKENS = 12
WAIT_SECONDS = 120


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def ask_both(driver, url: str, model_a: str, model_b: str) -> tuple[str, str]:
    """Chooses the two models, sends the prompt, and returns both streamed answers."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, WAIT_SECONDS)
    wait.until(expected_conditions.element_to_be_clickable((By.ID, "send")))
    Select(driver.find_element(By.ID, "model-a")).select_by_value(model_a)
    Select(driver.find_element(By.ID, "model-b")).select_by_value(model_b)
    Select(driver.find_element(By.ID, "mode")).select_by_value("chat")
    for field, value in (("max", str(MAX_TOKENS)), ("temperature", "0")):
        element = driver.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    driver.find_element(By.ID, "prompt").send_keys(PROMPT)
    driver.find_element(By.ID, "send").click()
    for side in ("a", "b"):
        wait.until(
            lambda d, side=side: d.find_element(By.ID, f"out-{side}").get_attribute("data-state") == "done"
        )
    return tuple(
        driver.execute_script(f"return document.getElementById('out-{side}').textContent")
        for side in ("a", "b")
    )


def api_answer(url: str, model: str, key: str = "unused") -> str:
    with openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60) as client:
        answer = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=MAX_TOKENS, temperature=0
        )
    return answer.choices[0].message.content


def test_playground_streams_two_adapters_side_by_side(browser, base_url) -> None:
    browser.get(base_url + "/")
    left, right = ask_both(browser, base_url, "a1", "org/a2")
    assert left and right and left != right
    assert left == api_answer(base_url, "a1")
    assert right == api_answer(base_url, "org/a2")
    shot = os.environ.get("LORASERVE_PLAYGROUND_SCREENSHOT")
    if shot:
        browser.save_screenshot(shot)
    assert browser.get_screenshot_as_png().startswith(b"\x89PNG")


def test_playground_asks_for_a_key_when_keys_are_on(browser, toy, tmp_path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    keys = Path(tmp_path) / "keys.toml"
    keys.write_text(key_entry_toml(ACME, "acme", ["a1", "org/*"], admin=False))
    with ServerThread(
        model=str(toy.base),
        adapters_dir=toy.store,
        api_keys_file=keys,
        kv_cache_bytes=2 << 20,
        http_port=free_port(),
    ) as srv:
        url = f"http://127.0.0.1:{srv.server.http.port}"
        browser.get(url + "/")
        wait = WebDriverWait(browser, WAIT_SECONDS)
        wait.until(expected_conditions.visibility_of_element_located((By.ID, "key")))
        assert not browser.find_element(By.ID, "send").is_enabled()
        browser.find_element(By.ID, "key").send_keys("lsk_wrong")
        browser.find_element(By.ID, "usekey").click()
        wait.until(lambda d: "invalid API key" in d.find_element(By.ID, "keyerror").text)
        key = browser.find_element(By.ID, "key")
        key.clear()
        key.send_keys(ACME)
        browser.find_element(By.ID, "usekey").click()
        left, right = ask_both(browser, url, "a1", "org/a2")
        options = browser.execute_script(
            "return Array.from(document.getElementById('model-a').options).map(o => o.value)"
        )
        assert sorted(options) == sorted([str(toy.base), "a1", "org/a2"])
        assert left == api_answer(url, "a1", ACME) and right == api_answer(url, "org/a2", ACME)
