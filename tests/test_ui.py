"""The web page in a real browser: headless Chromium (Debian's chromium + chromium-driver) driven by selenium,
against `atlaskv serve` (a subprocess) with the real model, the shipped adapter and the demo KB.

The tests run in file order and share one server and one browser: log in (a wrong key first), ask, add a
fact and see it cited, remove it and see it gone, bad input. Each step's screenshot goes to
$ATLASKV_UI_SHOTS (`ATLASKV_UI_SHOTS=docs/ui` regenerates the ones in the docs), else to a temporary folder.
"""
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("headless Chromium not found: `apt-get install chromium chromium-driver` (.ci/run does)",
                allow_module_level=True)
pytest.importorskip("selenium", reason="selenium not installed (pip install -e '.[dev]')")
pytest.importorskip("gguf")
import httpx
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from atlaskv.kb.store import KnowledgeBase

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
KEY = "sk-ui-" + "k" * 20
MAX_BODY = 64 * 1024
WAIT = 180  # seconds for an answer on a busy CPU
NEW = ("Mount Kilimanjaro", "country", "Tanzania")  # not in the demo KB
AUTH_ERROR = "missing or wrong API key (send Authorization: Bearer <key>)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_server(proc, url: str, headers: dict | None = None) -> None:
    for _ in range(1500):
        try:
            if httpx.get(url + "/health", headers=headers).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    raise AssertionError("the server did not start")


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_facts, encoder):
    kb = tmp_path_factory.mktemp("ui") / "demo_kb"
    KnowledgeBase.build(demo_facts, kb, encoder=encoder)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "atlaskv.cli", "serve", "--kb", str(kb), "--port", str(port),
                             "--max-body-bytes", str(MAX_BODY)],
                            env={**os.environ, "ATLASKV_API_KEY": KEY}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(proc, url, {"Authorization": f"Bearer {KEY}"})
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="atlaskv-chromium-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,860", "--force-device-scale-factor=1",
                 "--hide-scrollbars", f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    d = Path(os.environ.get("ATLASKV_UI_SHOTS") or tmp_path_factory.mktemp("shots"))
    d.mkdir(parents=True, exist_ok=True)
    return d


# ---------------------------------------------------------------------------------------------- helpers
def by_id(driver, id_: str):
    return driver.find_element(By.ID, id_)


def wait_until(driver, what, timeout: float = 20):
    # the page re-renders an element between finding it and reading its text: poll again, as for a missing one
    return WebDriverWait(driver, timeout, poll_frequency=0.1,
                         ignored_exceptions=(StaleElementReferenceException,)).until(lambda d: what(d))


def type_into(driver, id_: str, text: str) -> None:
    field = by_id(driver, id_)
    field.clear()
    field.send_keys(text)


def ask(driver, question: str) -> dict:
    """Ask on the page, wait for the answer: its text, cited facts and meta line, and how many times the
    text grew while it streamed."""
    n = len(driver.find_elements(By.CSS_SELECTOR, "#messages .answer"))
    driver.execute_script("""
        window.grew = 0;  // renders in which the answer's text changed
        new MutationObserver((records) => { if (records.some((r) => r.target.matches?.('.answer .text'))) window.grew++; })
            .observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});""")
    type_into(driver, "question", question)
    by_id(driver, "ask").click()
    answer = wait_until(driver, lambda d: (a := d.find_elements(By.CSS_SELECTOR, "#messages .answer"))[n:] and
                        "streaming" not in a[-1].get_attribute("class") and a[-1], WAIT)
    return {"text": answer.find_element(By.CSS_SELECTOR, ".text").text,
            "facts": [f.text for f in answer.find_elements(By.CSS_SELECTOR, ".citation .fact")],
            "bars": [b.value_of_css_property("width") for b in answer.find_elements(By.CSS_SELECTOR, ".bar")],
            "meta": answer.find_element(By.CSS_SELECTOR, ".meta").text if "failed" not in
            answer.get_attribute("class") else "", "grew": driver.execute_script("return window.grew")}


def edit(driver, button: str, head: str, relation: str, tail: str) -> None:
    for id_, value in (("head", head), ("relation", relation), ("tail", tail)):
        type_into(driver, id_, value)
    by_id(driver, button).click()


def edit_outcome(driver) -> str:
    """The edit panel's result or error line, once one shows."""
    return wait_until(driver, lambda d: by_id(d, "edit-result").text or by_id(d, "edit-error").text)


def kb_version(driver) -> str:
    return by_id(driver, "kb-version").text


def fact(t) -> str:
    return " | ".join(t)


# ---------------------------------------------------------------------------------------------- the steps
def test_wrong_key_is_refused_then_the_right_key_opens_the_page(server, browser, shots):
    browser.get(server + "/")
    wait_until(browser, lambda d: by_id(d, "login").is_displayed())
    assert not by_id(browser, "app").is_displayed()  # nothing but the login form without the key
    type_into(browser, "key", "sk-wrong")
    by_id(browser, "login-button").click()
    assert wait_until(browser, lambda d: by_id(d, "login-error").text) == AUTH_ERROR  # the server's 401 message
    assert not by_id(browser, "app").is_displayed()
    browser.save_screenshot(str(shots / "01-wrong-key.png"))
    type_into(browser, "key", KEY)
    by_id(browser, "login-button").click()
    wait_until(browser, lambda d: by_id(d, "app").is_displayed())
    assert by_id(browser, "kb-facts").text == "3,944" and kb_version(browser) == "1"
    assert not by_id(browser, "login").is_displayed()
    # the key is in no URL, no storage and no cookie
    assert KEY not in browser.current_url
    assert browser.execute_script("return [localStorage.length, sessionStorage.length, document.cookie]") == [0, 0, ""]


def test_answer_streams_with_its_cited_facts(server, browser, shots):
    got = ask(browser, "What is the place of death of Elvis Presley?")
    assert "Memphis" in got["text"] and "answered" in got["meta"] and "support" in got["meta"]
    assert got["facts"][0] == "Elvis Presley | place of death | Memphis"
    widths = [float(w.removesuffix("px")) for w in got["bars"]]
    assert len(widths) == len(got["facts"]) and widths[0] > max(widths[1:]) > 0  # share of the KB attention
    assert got["grew"] >= 3, got  # the text came piece by piece
    title = wait_until(browser, lambda d: by_id(d, "graph-title").text)
    assert title.startswith("Elvis Presley: 6 facts")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#graph .node")) == 6
    browser.save_screenshot(str(shots / "02-answer.png"))


def test_kb_panel_search(server, browser, shots):
    type_into(browser, "search", "elvis")
    items = wait_until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#search-results li"))
    assert len(items) == 6 and all(i.text.startswith("Elvis Presley | ") for i in items)
    assert by_id(browser, "search-summary").text == "6 facts"
    browser.find_element(By.CSS_SELECTOR, "#relations-box summary").click()
    assert browser.find_element(By.CSS_SELECTOR, "#relations li").text.startswith("nationality")
    browser.save_screenshot(str(shots / "03-kb-panel.png"))
    browser.find_element(By.CSS_SELECTOR, "#relations-box summary").click()


def test_added_fact_is_cited_then_removed_is_gone(server, browser, shots):
    question = "What is the country of Mount Kilimanjaro?"
    edit(browser, "add", *NEW)
    assert edit_outcome(browser) == f"{fact(NEW)}: added 1. KB version 2, 3,945 facts."
    wait_until(browser, lambda d: kb_version(d) == "2")
    got = ask(browser, question)
    assert "Tanzania" in got["text"] and got["facts"][0] == fact(NEW)
    browser.save_screenshot(str(shots / "04-added-fact-cited.png"))

    edit(browser, "remove", *NEW)
    assert wait_until(browser, lambda d: "removed" in by_id(d, "edit-result").text and by_id(d, "edit-result").text) \
        == f"{fact(NEW)}: removed 1. KB version 3, 3,944 facts."
    got = ask(browser, question)
    assert fact(NEW) not in got["facts"] and "Tanzania" not in got["text"]
    browser.save_screenshot(str(shots / "05-removed-fact-gone.png"))


def test_file_upload_adds_and_removes_all_its_facts(server, browser, tmp_path):
    f = tmp_path / "more.jsonl"
    f.write_text('{"head": "Ada Lovelace", "relation": "place of birth", "tail": "London"}\n\n'
                 '{"subject": "Alan Turing", "predicate": "place of birth", "object": "Maida Vale"}\n')
    by_id(browser, "file").send_keys(str(f))
    by_id(browser, "add-file").click()
    assert wait_until(browser, lambda d: by_id(d, "edit-result").text.startswith("more.jsonl")) \
        and by_id(browser, "edit-result").text == "more.jsonl (2 facts): added 2. KB version 4, 3,946 facts."
    by_id(browser, "remove-file").click()
    assert wait_until(browser, lambda d: "removed" in by_id(d, "edit-result").text and by_id(d, "edit-result").text) \
        == "more.jsonl (2 facts): removed 2. KB version 5, 3,944 facts."


def test_bad_input_shows_the_error_and_changes_nothing(server, browser, shots, tmp_path):
    # an empty field: the server's 422 message
    edit(browser, "add", "Mount Kilimanjaro", "country", "")
    assert edit_outcome(browser) == "invalid request: triples.0.tail: String should have at least 1 character"
    assert kb_version(browser) == "5"
    browser.save_screenshot(str(shots / "06-empty-field.png"))

    # a malformed upload: refused whole in the page, with its row number; nothing sent
    bad = tmp_path / "bad.tsv"
    bad.write_text("head\trelation\ttail\nMount Kenya\tcountry\tKenya\nMount Fuji\tcountry\n")
    by_id(browser, "file").send_keys(str(bad))
    by_id(browser, "add-file").click()
    assert edit_outcome(browser) == \
        "bad.tsv line 3: expected 3 tab-separated columns (head, relation, tail), found 2"
    assert kb_version(browser) == "5"
    browser.save_screenshot(str(shots / "07-bad-upload.png"))
    r = httpx.get(server + "/v1/kb/search", params={"head": "Mount Kenya"}, headers={"Authorization": f"Bearer {KEY}"})
    assert r.json()["total"] == 0 and r.json()["version"] == 5

    bad.write_text('Mount Kenya,country,Kenya\n"Mount Fuji,country,Japan\n')
    by_id(browser, "file").send_keys(str(bad.rename(tmp_path / "bad.csv")))
    by_id(browser, "add-file").click()
    assert wait_until(browser, lambda d: "bad.csv" in by_id(d, "edit-error").text and by_id(d, "edit-error").text) \
        == "bad.csv line 2: CSV error: a quoted field is never closed"

    # a file over the server's body limit: its 413 message
    big = tmp_path / "big.tsv"
    big.write_text("".join(f"Peak number {i}\theight in metres\t{1000 + i} metres above the sea\n" for i in range(1500)))
    by_id(browser, "file").send_keys(str(big))
    by_id(browser, "add-file").click()
    assert wait_until(browser, lambda d: "bytes" in by_id(d, "edit-error").text and by_id(d, "edit-error").text) \
        == f"request body over {MAX_BODY} bytes"
    assert kb_version(browser) == "5"

    # an empty question: the server's message under the chat
    got = ask(browser, " ")
    assert got["text"] == "no user message with a question" == by_id(browser, "chat-error").text


def test_ui_command_builds_the_kb_and_serves_the_page(tmp_path):
    facts = tmp_path / "facts.tsv"
    facts.write_text("Ada Lovelace\tplace of birth\tLondon\nAlan Turing\tplace of birth\tMaida Vale\n")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("ATLASKV_API_KEY", "DISPLAY", "WAYLAND_DISPLAY")}
    proc = subprocess.Popen([sys.executable, "-m", "atlaskv.cli", "ui", "--kb", str(tmp_path / "kb"), "--facts",
                             str(facts), "--port", str(port), "--no-open"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "atlaskv ui: open" in line:
                break
        url = f"http://127.0.0.1:{port}/"
        assert f"atlaskv ui: open {url}" in lines[-1], "".join(lines)
        assert any("building" in line for line in lines)
        page = httpx.get(url)
        assert page.status_code == 200 and '<script src="/static/app.js"' in page.text
        assert "default-src 'none'" in page.headers["content-security-policy"]
        assert httpx.get(url + "v1/kb").json()["triples"] == 2
    finally:
        proc.terminate()
        proc.wait(10)
