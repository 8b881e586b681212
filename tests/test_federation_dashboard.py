"""The coordinator's dashboard in a real headless browser (Debian's Chromium through selenium): the chart draws
one line per frozen set, the tables list releases and submissions by blind id, senders stay hidden from anyone
without an admin token, and an admin token reveals who sent each decided submission."""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from federation_service import serving

from seshu.federation import auth
from seshu.federation.app import create_app
from seshu.federation.database import sqlite_url, upgrade
from seshu.federation.layout import Federation
from seshu.federation.models import Release, Submission, utcnow

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT_SECONDS = 30
# A contributor's name is shown as text, never run as markup.
HOSTILE_NAME = "<img src=x onerror=\"document.title='pwned'\">"


def _score(value: float, higher_is_better: bool, metric: str) -> dict[str, Any]:
    return {"value": value, "higher_is_better": higher_is_better, "metric": metric}


def _metrics(general: float, instruct: float, chrf: float) -> dict[str, Any]:
    return {
        "general-en": _score(general, False, "perplexity"),
        "instruct": _score(instruct, False, "answer_ppl"),
        "translation-hi": _score(chrf, True, "chrf"),
    }


SETS = ["general-en", "instruct", "translation-hi"]
# blind id -> (sender, status, release trained on, merged into)
SUBMISSIONS = {
    "b0000merged0001": ("asha", "merged", 0, 1),
    "b0000merged0002": (HOSTILE_NAME, "merged", 1, 2),
    "b0000rejected03": ("bala", "rejected", 1, None),
    "b0000waiting004": ("bala", "validated", 2, None),
    "b0000accepted05": ("chandra", "accepted", 2, None),
}


def dashboard_federation(folder: Path) -> tuple[Federation, str]:
    """A federation as the dashboard sees it (the database only: three releases and five submissions); returns it
    and an admin token."""
    folder.mkdir()
    (folder / "federation.yaml").write_text(f"db: {sqlite_url(folder)}\nstore: {folder / 'store'}\n")
    fed = Federation.open(folder)
    upgrade(fed.db.engine)
    with fed.db.transaction() as session:
        _, admin = auth.add_client(session, "root", "admin")
        ids = {}
        for name in ("asha", HOSTILE_NAME, "bala", "chandra"):
            ids[name] = auth.add_client(session, name, "client")[0].id
        for version, metrics in enumerate([_metrics(400.0, 380.0, 10.0), _metrics(396.0, 300.0, 14.0),
                                           _metrics(380.0, 260.0, 21.0)]):  # fmt: skip
            session.add(
                Release(version=version, parent=version - 1 if version else None, manifest_sha256="0" * 64,
                        method="fedavg" if version else None, metrics=metrics)
            )  # fmt: skip
            session.flush()
        for blind, (name, status, release, merged) in SUBMISSIONS.items():
            decided = status != "validated"
            session.add(
                Submission(
                    blind_id=blind, client_id=ids[name], release_version=release, task="instruct", language="en",
                    status=status, source="upload", merged_in=merged, weight=1.0 if merged else None,
                    reason="task_gain: instruct is 0.40% worse" if status == "rejected" else "",
                    gains={"instruct": 0.1} if decided else {}, decided_at=utcnow() if decided else None,
                )
            )  # fmt: skip
    return fed, admin


def _browser_missing() -> str | None:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not shutil.which(path)]
    if importlib.util.find_spec("selenium") is None:
        missing.append("the selenium package")
    return ", ".join(missing) or None


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    missing = _browser_missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"the dashboard test needs {missing}: .ci/run installs chromium and chromium-driver")
        pytest.skip(f"the dashboard test needs {missing} (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1200,1400"):  # fmt: skip
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT_SECONDS)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver: Any, condition: Any, what: str) -> Any:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # The page rebuilds its tables when data arrives: an element read across a rebuild is stale; read again.
    wait = WebDriverWait(driver, WAIT_SECONDS, ignored_exceptions=(StaleElementReferenceException,))
    return wait.until(lambda d: condition(d), message=f"waiting for {what}")


def _sender_cells(driver: Any) -> dict[str, str]:
    from selenium.webdriver.common.by import By

    rows = driver.find_elements(By.CSS_SELECTOR, "#submissions tbody tr")
    return {row.get_attribute("id").removeprefix("sub-"): row.find_elements(By.TAG_NAME, "td")[1].text for row in rows}


def _reveal(driver: Any, token: str) -> None:
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.ID, "token")
    field.clear()
    field.send_keys(token)
    driver.find_element(By.ID, "reveal").click()


def test_the_dashboard_in_a_browser(browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    fed, admin = dashboard_federation(tmp_path / "fed")
    with fed.db.transaction() as session:
        _, worker = auth.add_client(session, "w1", "worker")
    with serving(create_app(fed)) as url:
        browser.get(f"{url}/")

        # One line per frozen set, through every release that measured it.
        lines = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#chart svg polyline") or None, "the chart")
        assert sorted(line.get_attribute("data-set") for line in lines) == SETS
        for line in lines:  # three points left to right; a rising value is drawn higher (SVG's y grows down)
            points = [tuple(map(float, p.split(","))) for p in line.get_attribute("points").split()]
            xs, ys = zip(*points, strict=True)
            assert len(points) == 3 and list(xs) == sorted(set(xs))
            assert list(ys) == sorted(ys, reverse=line.get_attribute("data-set") == "translation-hi")
        legend = browser.find_element(By.ID, "legend").text
        assert "translation-hi (chrf, higher is better)" in legend and "general-en (perplexity, lower" in legend

        releases = browser.find_elements(By.CSS_SELECTOR, "#releases tbody tr")
        assert [row.find_element(By.TAG_NAME, "td").text for row in releases] == ["v0", "v1", "v2"]
        assert browser.find_element(By.ID, "headline").text == "current release v2, 5 submission(s)"

        # Anonymous: every submission by blind id with its state, no sender; only merged work is credited by name.
        _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#submissions tbody tr")) == 5, "the table")
        assert _sender_cells(browser) == dict.fromkeys(SUBMISSIONS, "-")
        statuses = {row.get_attribute("id"): row.find_elements(By.TAG_NAME, "td")[5].text
                    for row in browser.find_elements(By.CSS_SELECTOR, "#submissions tbody tr")}  # fmt: skip
        assert statuses == {f"sub-{blind}": status for blind, (_, status, _, _) in SUBMISSIONS.items()}
        page = browser.find_element(By.TAG_NAME, "body").text
        assert "bala" not in page and "chandra" not in page and "root" not in page
        assert "task_gain: instruct is 0.40% worse" in page  # a rejection's reason is public; its sender is not
        assert "asha (instruct, en)" in releases[1].text
        # The hostile name is text: no element was made of it and its script never ran.
        assert HOSTILE_NAME in releases[2].text and not browser.find_elements(By.CSS_SELECTOR, "#releases img")
        assert browser.title == "Seshu federation"

        # A wrong token, and a token without the admin role, are refused and reveal nothing.
        _reveal(browser, "seshu_not-a-token")
        _wait(browser, lambda d: "token refused (401)" in d.find_element(By.ID, "headline").text, "the refusal")
        _reveal(browser, worker)
        _wait(browser, lambda d: "token refused (403)" in d.find_element(By.ID, "headline").text, "the refusal")
        assert _sender_cells(browser) == dict.fromkeys(SUBMISSIONS, "-")

        # The admin sees who sent every decided submission; one still waiting stays anonymous even to them.
        _reveal(browser, admin)
        _wait(browser, lambda d: _sender_cells(d)["b0000rejected03"] == "bala", "the senders")
        senders = {blind: name if status != "validated" else "-" for blind, (name, status, _, _) in SUBMISSIONS.items()}
        assert _sender_cells(browser) == senders
        assert "token refused" not in browser.find_element(By.ID, "headline").text
        assert browser.title == "Seshu federation"

        shot = tmp_path / "dashboard.png"
        assert browser.save_screenshot(str(shot))
        data = shot.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    fed.close()
