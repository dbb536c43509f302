"""The dashboard in a real headless Chromium during a live 3-leaf simulation (Lightning leaves in processes
of their own, the embedded server, the real callback): it shows the branch, follows the open round as
leaves upload without a reload, plots the metrics after two rounds, and its pause button pauses the run
(the leaves log the pause). Without the token it shows nothing and its calls are refused. An analytics round's
result shows as a table (per column the derived statistics and the leaves that contributed), and the next analytics
round replaces it live.

``BRANCHKEY_DASHBOARD_SCREENSHOT=docs/dashboard.png`` saves the page of the finished run (the README's picture).
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from queue import Queue

import numpy as np
import pytest
import requests
from playwright.sync_api import expect

from branchkey_integrations.simulate import run
from branchkey_integrations.simulation.progress import Stage

from ..conftest import wait_until

pytestmark = pytest.mark.slow

RECORD_LEAF_STATES = """() => {
  window.__seen = new Set(); window.__loaded = performance.timeOrigin;
  const record = () => document.querySelectorAll('[data-testid=leaf-state]').forEach(c => window.__seen.add(c.firstChild.textContent));
  new MutationObserver(record).observe(document.getElementById('leaves'), {childList: true, subtree: true});
  record();
}"""


HISTORY_CAUGHT_UP = """(() => {
  const latest = /latest aggregate: round (\\d+)/.exec(document.getElementById('round-facts').textContent);
  return latest !== null && document.querySelectorAll('[data-testid=round-row]').length === +latest[1];  // rounds from 1, as the callbacks count
})()"""


def leaf_logs(root: Path) -> dict[str, str]:
    return {path.stem: path.read_text(errors="replace") for path in root.glob("branchkey-simulate-*/leaf_*.log")}


def test_the_dashboard_follows_a_live_simulation_and_pauses_it(tmp_path, page, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the simulation's work directory (leaf logs) goes here
    links: Queue = Queue()
    outcome: dict = {}
    finished, release = threading.Event(), threading.Event()

    def hold(report) -> None:  # the run is over; its server (and the page's event stream) stays up meanwhile
        outcome["held"] = report
        finished.set()
        release.wait(300)

    def progress(event) -> None:
        if isinstance(event, Stage) and event.link:
            links.put(event.link)

    def simulate() -> None:
        try:
            outcome["report"] = run(framework="lightning", leaves=3, rounds=12, epochs_per_round=1, dashboard=True,
                                    progress=progress, hold=hold, round_timeout_s=240, timeout_s=480)
        except BaseException as exc:  # reported by the assertion below
            outcome["error"] = exc

    thread = threading.Thread(target=simulate, daemon=True)
    thread.start()
    try:
        link = links.get(timeout=120)
        page.goto(link)
        page.get_by_test_id("branch-row").wait_for()
        assert page.get_by_test_id("branch-row").count() == 1
        assert "#login" not in page.url  # the one-time code left the address bar
        page.evaluate(RECORD_LEAF_STATES)
        loaded = page.evaluate("window.__loaded")

        # the open round moves on by itself: leaves upload, rounds advance, the page is never reloaded
        # (a leaf's 'uploaded' state may last too short to render: turns upload and the round closes at once)
        page.wait_for_function("window.__seen.has('uploaded') || window.__seen.has('missing')", timeout=120_000)
        page.wait_for_function("document.querySelectorAll('[data-testid=round-row]').length >= 2", timeout=120_000)
        expect(page.get_by_test_id("leaf-row")).to_have_count(3)
        # the metric plot after two rounds: the mean and each of the three leaves
        page.wait_for_function("[...document.querySelectorAll('[data-testid=plot]')].some("
                               "f => f.dataset.metric === 'test/heldout_accuracy' && +f.dataset.rounds >= 2 && +f.dataset.leaves === 3)",
                               timeout=120_000)
        expect(page.locator("[data-metric='test/heldout_accuracy'] figcaption")).to_contain_text(
            "held-out accuracy on the leaf's own data")
        assert page.locator("[data-testid=plot] canvas").count() >= 1

        page.get_by_test_id("pause-button").click()
        page.wait_for_function("document.querySelector('[data-testid=run-status]').textContent === 'pause'")
        # a leaf in its turn holds its upload (a leaf between turns has no process running: its next turn waits)
        wait_until(lambda: any("is now 'pause'" in text or "waiting for start" in text
                               for text in leaf_logs(tmp_path).values()), 60, "a leaf in its turn to hold for the pause")
        assert "error" not in outcome and thread.is_alive(), outcome  # paused, not finished
        assert page.evaluate("window.__loaded") == loaded
        page.wait_for_function(HISTORY_CAUGHT_UP)  # the table holds every aggregated round, the latest included

        with page.expect_download() as download:  # an aggregate, through a signed URL from an admin route
            page.get_by_test_id("download").first.click()
        assert download.value.suggested_filename.endswith(".npz") and "#login" not in download.value.url
        assert Path(download.value.path()).stat().st_size > 0

        page.get_by_test_id("start-button").click()
        assert finished.wait(300) or "error" in outcome, "the run did not finish"
        assert "error" not in outcome, outcome
        # the finished run reads as finished; the common test set's accuracy (the terminal's figure) is plotted
        # beside the leaves' held-out accuracy, up to the last round
        expect(page.get_by_test_id("round-title")).to_have_text("No open round: run 1 stopped after 12 aggregated rounds")
        page.wait_for_function("[...document.querySelectorAll('[data-testid=plot]')].some("
                               "f => f.dataset.metric === 'test/common_test_accuracy' && +f.dataset.rounds === 12)")
        final = outcome["held"].final.global_accuracy
        legend = page.locator("[data-metric='test/common_test_accuracy'] .u-legend .u-value").all_inner_texts()
        assert abs(float(legend[1]) - final) < 1e-3, (legend, final)  # the latest value, before any hover
        if os.environ.get("BRANCHKEY_DASHBOARD_SCREENSHOT"):
            page.screenshot(path=os.environ["BRANCHKEY_DASHBOARD_SCREENSHOT"], full_page=True)
    finally:
        release.set()  # the simulation's server stops, whatever happened above
    thread.join(120)
    assert not thread.is_alive() and "error" not in outcome, outcome
    assert len(outcome["report"].rounds) == 12 and outcome["report"].final.global_accuracy == final


def test_without_the_token_the_page_shows_nothing_and_its_calls_are_refused(inprocess_server, page):
    server, leaves = inprocess_server(2)
    branch = leaves[0]["branch_id"]
    page.goto(server.url + "/")
    page.get_by_test_id("login").wait_for()
    assert page.locator("#app").is_hidden()
    text = page.content()
    assert branch not in text and "leaf_1" not in text
    # a wrong token in the session: every call is refused and the page falls back to the login form
    page.evaluate("sessionStorage.setItem('branchkey-local-admin-token', 'wrong')")
    statuses = []
    page.on("response", lambda r: statuses.append(r.status) if "/admin/v1/" in r.url else None)
    page.reload()
    page.get_by_test_id("login").wait_for()
    assert statuses and set(statuses) <= {401}, statuses
    assert branch not in page.content()
    answer = page.request.post(f"{server.url}/admin/v1/branches/{branch}/run", data={"run_status": "pause"})
    assert answer.status == 401
    assert server.admin("GET", f"/admin/v1/branches/{branch}").json()["data"]["run_status"] == "start"
    # with the token typed in: the branch shows
    page.fill("#token", server.admin_token)
    page.click("#login-form button")
    page.get_by_test_id("branch-row").wait_for()
    expect(page.get_by_test_id("leaf-row")).to_have_count(2)  # the open round's rows come with a later call
    assert all(leaf["session_token"] not in page.content() for leaf in leaves)
    assert requests.get(server.url + "/admin/v1/overview", timeout=10).status_code == 401


def test_the_dashboard_shows_an_analytics_result_and_follows_the_next_round(inprocess_server, page):
    from .test_analytics import POOLED, SITES, bundle, send, set_ops

    server, leaves = inprocess_server(3)
    set_ops(server, leaves[0]["branch_id"], {"labels": "sum"})
    page.goto(server.url + "/")
    page.fill("#token", server.admin_token)
    page.click("#login-form button")
    page.get_by_test_id("branch-row").wait_for()
    expect(page.locator("#live-state")).to_have_text("live")  # the event stream is open: no upload event is missed
    expect(page.get_by_test_id("analytics-title")).to_have_text("(no result yet)")
    expect(page.get_by_test_id("analytics-facts")).to_contain_text("field operations: labels=sum")
    loaded = page.evaluate("performance.timeOrigin")

    send(server, leaves[0], {**bundle(SITES[0]), "labels": np.array([1, 2])})  # the open analytics round shows
    expect(page.get_by_test_id("analytics-facts")).to_contain_text("open analytics round 1: 1 of 3 uploads")
    for leaf, values in zip(leaves[1:], SITES[1:]):
        send(server, leaf, {**bundle(values), "labels": np.array([1, 2])})
    row = page.locator("[data-testid=analytics-row][data-column=age]")
    expect(row.locator("[data-stat=mean]")).to_have_text(f"{POOLED.mean():.4f}")  # 43.3333
    expect(row.locator("[data-stat=std]")).to_have_text(f"{POOLED.std():.4f}")
    for stat, shown in {"count": "6", "min": "10", "max": "90", "range": "80", "nan": "1", "completeness": "0.8571",
                        "leaves": "3"}.items():
        expect(row.locator(f"[data-stat={stat}]")).to_have_text(shown)
    expect(page.get_by_test_id("analytics-title")).to_have_text("(analytics round 1 of run 1)")
    field = page.locator("[data-testid=analytics-field][data-field=labels]")
    expect(field).to_contain_text("sum")
    expect(field).to_contain_text("[3, 6]")
    expect(page.get_by_test_id("round-row")).to_have_count(0)  # the learning history is its own: no round aggregated

    for leaf in leaves:  # the next analytics round replaces the table, live, without a reload
        send(server, leaf, {**bundle([2.0, 4.0]), "labels": np.array([0, 1])})
    expect(row.locator("[data-stat=mean]")).to_have_text("3")
    expect(row.locator("[data-stat=count]")).to_have_text("6")
    expect(page.get_by_test_id("analytics-title")).to_have_text("(analytics round 2 of run 1)")
    assert page.evaluate("performance.timeOrigin") == loaded


def test_the_dashboard_revokes_and_rotates_a_leaf_and_shows_the_audit_trail(inprocess_server, page):
    server, leaves = inprocess_server(2)
    page.goto(server.url + "/")
    page.get_by_test_id("login").wait_for()
    page.fill("#token", server.admin_token)
    page.click("#login-form button")
    expect(page.get_by_test_id("leaf-row")).to_have_count(2)
    page.on("dialog", lambda dialog: dialog.accept())  # the confirmation
    page.locator('[data-leaf="leaf_1"] [data-testid="revoke-leaf"]').click()
    expect(page.get_by_test_id("leaf-row")).to_have_count(1)  # a revoked leaf leaves the open round's table
    with page.expect_download() as download:
        page.locator('[data-leaf="leaf_2"] [data-testid="rotate-leaf"]').click()
    credentials = json.loads(Path(download.value.path()).read_text())
    assert credentials["id"] == leaves[1]["id"] and credentials["session_token"] != leaves[1]["session_token"]
    # the branch made, its two leaves added, the revocation, the rotation: the latest first
    expect(page.get_by_test_id("audit-row")).to_have_count(4)
    rows = page.get_by_test_id("audit-row").all_inner_texts()
    assert rows[0].startswith(tuple("0123456789")) and "leaf.rotate" in rows[0] and "leaf.revoke" in rows[1]
    assert credentials["session_token"] not in page.content()
    run = f"{server.url}/api/v1/run/{leaves[0]['branch_id']}"
    for leaf, status in ((leaves[0], 401), (leaves[1], 401), (credentials, 200)):
        answer = requests.get(run, headers={"Authorization": f"Bearer {leaf['id']}:{leaf['session_token']}"}, timeout=10)
        assert answer.status_code == status
