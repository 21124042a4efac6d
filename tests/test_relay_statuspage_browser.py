"""The status page in a real headless browser (Debian's chromium through chromium-driver and
Selenium) against the real ``twistd twistmail``: the login, the counts against the API, retry,
and a campaign handed to the relay by ``twistmail send --queue``.

``scripts/test`` installs chromium and chromium-driver when they are missing and it runs as
root (as CI does). Under ``CI`` a missing browser fails the test; elsewhere it is skipped with
how to get one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from relay_process import RelayProcess
from servers import CueServer
from test_relay_api_process import call, manage_tokens
from test_relay_auth_http import http_port
from test_relay_campaigns import TEMPLATE
from test_relay_delivery import wait_until

HOW = (
    "the status page's browser test needs Debian's chromium and chromium-driver "
    "(apt-get install chromium chromium-driver; scripts/test does it as root) and selenium "
    "(pip install -e '.[test]')"
)


def _browser_parts() -> tuple[str, str] | str:
    """(chromium, chromedriver) paths, or what is missing."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed"
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        return "chromium or chromedriver is not installed"
    return chromium, driver


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """A headless chromium driven by Selenium (fails under CI when it cannot be had)."""
    parts = _browser_parts()
    if isinstance(parts, str):
        if os.environ.get("CI"):
            pytest.fail(f"{parts}: {HOW}")
        pytest.skip(f"{parts}: {HOW}")
    chromium, driver_path = parts
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in (
        "--headless=new",
        "--no-sandbox",  # root in CI
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def page_counts(driver: Any) -> dict[str, int]:
    from selenium.webdriver.common.by import By

    counts = {}
    for cell in driver.find_elements(By.CSS_SELECTOR, "#counts td[id^=count-]"):
        state = cell.get_attribute("id").removeprefix("count-")
        if state != "total":
            counts[state] = int(cell.text)
    return counts


def api_counts(port: int, token: str) -> dict[str, int]:
    """Messages by state as the API lists them (every page)."""
    found: Counter[str] = Counter()
    cursor = ""
    while True:
        status, page, _ = call(port, f"/v1/messages?limit=1000{cursor}", token=token, method="GET")
        assert status == 200, page
        found.update(m["state"] for m in page["messages"])
        if page["next_cursor"] is None:
            return dict(found)
        cursor = f"&cursor={page['next_cursor']}"


def test_the_status_page_in_a_browser_logs_in_matches_the_api_and_retries(
    browser: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    tokens = tmp_path / "tokens"
    token = manage_tokens("add", "ops", tokens).stdout.strip()
    # 5.7.1, not 5.1.1: a refusal that does not suppress the address, so a retry sends it.
    refusing = {"nobody": "550 5.7.1 no such user"}
    with (
        CueServer(rcpt_replies_once=refusing) as upstream,
        RelayProcess(
            tmp_path / "q.db",
            upstream.port,
            "--no-bounces",
            "--api-token-file",
            str(tokens),
            http="tcp:0:interface=127.0.0.1",
        ) as relay,
    ):
        port = http_port(relay)
        base = f"http://127.0.0.1:{port}"
        ids = []
        for to in ("a@example.org", "b@example.org", "nobody@example.org"):
            message = {"from": "app@example.com", "to": to, "subject": "hi", "text": "x"}
            status, body, _ = call(port, "/v1/messages", message, token=token)
            assert status == 202, body
            ids.append(body["id"])
        refused = ids[2]
        relay.wait_for(rf"delivery {refused} .*status=failed")
        for sent in ids[:2]:
            relay.wait_for(rf"delivery {sent} .*status=sent")

        # No session: the page sends the browser to the login form.
        browser.get(base + "/")
        assert browser.current_url == base + "/login"
        assert browser.find_elements(By.ID, "counts") == []
        browser.find_element(By.ID, "token").send_keys(token)
        browser.find_element(By.CSS_SELECTOR, "#login button[type=submit]").click()
        wait_until(lambda: browser.current_url == base + "/", what="the login to open the page")
        assert token not in browser.current_url
        cookie = browser.get_cookie("twistmail_session")
        assert cookie is not None
        assert cookie["httpOnly"] is True
        assert cookie["sameSite"] == "Strict"
        assert browser.execute_script("return document.cookie") == ""  # script cannot read it

        # The counts on the page are the API's.
        assert page_counts(browser) == {
            **dict.fromkeys(page_counts(browser), 0),
            **api_counts(port, token),
        }
        assert page_counts(browser)["failed"] == 1
        # The relay counted its attempts of the last hour, and the upstream works.
        assert browser.find_element(By.ID, "hour").text == "2 sent, 0 deferred, 1 failed."
        assert browser.find_element(By.ID, "upstream").text == "ok"
        assert browser.find_element(By.ID, "oldest").text == "No message is waiting."
        row = browser.find_element(By.ID, f"failure-{refused}")
        assert "550 5.7.1 no such user" in row.text

        # Retry: the refusal was once only, so the message goes out.
        row.find_element(By.CSS_SELECTOR, "button.retry").click()
        wait_until(lambda: browser.current_url == f"{base}/?retried={refused}")
        assert (
            f"Message {refused} is back in the queue." in browser.find_element(By.ID, "notice").text
        )
        relay.wait_for(rf"delivery {refused} .*status=sent")
        browser.get(base + "/")
        assert page_counts(browser)["failed"] == 0
        assert page_counts(browser)["sent"] == 3
        assert browser.find_element(By.ID, "hour").text == "3 sent, 0 deferred, 1 failed."
        assert page_counts(browser) == {
            **dict.fromkeys(page_counts(browser), 0),
            **api_counts(port, token),
        }
        assert sum("nobody@example.org" in m.recipients for m in upstream.received) == 1

        # Logged out (or with no cookie at all), the page is the login form again.
        browser.find_element(By.ID, "logout").click()
        wait_until(lambda: browser.current_url == base + "/login")
        browser.delete_all_cookies()
        browser.get(base + "/")
        assert browser.current_url == base + "/login"
    assert token not in "\n".join(relay.lines)


def test_a_campaign_handed_to_the_relay_shows_on_the_page_with_its_counts(
    browser: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    tokens = tmp_path / "tokens"
    token = manage_tokens("add", "ops", tokens).stdout.strip()
    path = tmp_path / "q.db"
    (tmp_path / "terms.txt").write_bytes(b"the terms\n")
    (tmp_path / "message.txt").write_text(TEMPLATE)
    people = [f"p{i}@example.org,P {i},c{i}" for i in range(5)]
    (tmp_path / "people.csv").write_text("\n".join(["email,name,code", *people, "bad,X,0"]) + "\n")
    name = "spring <em>sale"  # no "/": it is part of the API's URL
    with (
        CueServer(rcpt_replies_once={"p3": "550 5.1.1 no such user"}) as upstream,
        RelayProcess(
            path, upstream.port, "--no-bounces", "--api-token-file", str(tokens),
            http="tcp:0:interface=127.0.0.1",
        ) as relay,
    ):  # fmt: skip
        port = http_port(relay)
        handed = subprocess.run(
            [sys.executable, "-m", "twistmail", "send", "people.csv", "message.txt", "--queue",
             f"sqlite:{path}", "--enqueue-only", "--campaign", name],
            capture_output=True, text=True, cwd=tmp_path, timeout=60, check=False,
        )  # fmt: skip
        assert handed.returncode == 1, handed.stdout + handed.stderr  # 1: a row is invalid
        assert "5 queued now" in handed.stdout
        quoted = urllib.parse.quote(name, safe="")

        def settled() -> dict[str, Any] | None:
            status, shown, _ = call(port, f"/v1/campaigns/{quoted}", token=token, method="GET")
            assert status == 200, shown
            return shown if shown["counts"].get("pending", 0) == 0 else None

        wait_until(lambda: settled() is not None, what="the campaign to be delivered")
        shown = settled()
        assert shown is not None
        assert shown["counts"] == {"sent": 4, "failed": 1, "invalid": 1}

        browser.get(f"http://127.0.0.1:{port}/login")
        browser.find_element(By.ID, "token").send_keys(token)
        browser.find_element(By.CSS_SELECTOR, "#login button[type=submit]").click()
        wait_until(lambda: browser.current_url.endswith("/"), what="the login to open the page")
        row = browser.find_element(By.ID, f"campaign-{shown['id']}")
        assert row.find_element(By.CSS_SELECTOR, "td.name").text.startswith(name)
        assert browser.find_elements(By.CSS_SELECTOR, "#campaigns em") == []  # text, not markup
        cells = {
            cell.get_attribute("data-state"): int(cell.text)
            for cell in row.find_elements(By.CSS_SELECTOR, "td[data-state]")
        }
        assert cells == {
            **dict.fromkeys(("pending", "deferred", "duplicate"), 0),
            **shown["counts"],
            "total": shown["total"],
        }
        assert row.find_element(By.CSS_SELECTOR, "td.eta").text == "done"
        assert row.find_element(By.CSS_SELECTOR, "td.rate").text == "4 rows/min"
    assert token not in "\n".join(relay.lines)
