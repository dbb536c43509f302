"""``python -m benchmarks.dashboard``: the dashboard's first paint over a big store, in headless Chromium.

A script fills a fresh store with one branch of ``--leaves`` leaves and ``--rounds`` aggregated rounds:
every leaf uploads in every round (weighting = its sample count) and sends ``test`` and ``train``
metrics (accuracy, loss) for every aggregate, the rows ``branchkey-local`` writes for a real run
(100 leaves x 200 rounds: 20,000 uploads, 40,000 metric reports). The rows go in with one SQL
transaction through the store's own connection; the model files are not written (the page never
reads them). Then ``branchkey-local serve`` (a subprocess, as users run it) serves that store, and
Chromium (Debian's, through Playwright) opens the dashboard ``--repeat`` times in fresh contexts
with the admin token already in the session.

Each repetition starts a fresh server (empty caches) and opens the page cold, then again warm
(the server's summary cache filled). Medians over the repetitions, from navigation start:

- ``painted``: the first frame showing the federation (branches, the open round with its 100 leaves,
  the table of 200 rounds);
- ``complete``: the first frame with every plot drawn too (mean and 100 leaves per metric);
- ``fcp``: the browser's first contentful paint (the page's empty shell);

and each JSON route the page reads, fetched ``--repeat`` times in turn from one server started afresh after
the browser runs: ``cold_s`` is a route's first answer on it (the routes before it may have warmed what they
share with it), ``warm_median_s`` the median of the others.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import requests

from branchkey_integrations.server.store import Store
from .common import load_average
from .harness import CHROMIUM, CHROMIUM_ARGS, serve


def fill_store(data_dir: Path, leaves: int, rounds: int, seed: int = 0) -> str:
    """A branch with ``rounds`` aggregated rounds of ``leaves`` uploads and metrics each; returns its id."""
    rng = random.Random(seed)
    store = Store(data_dir)
    try:
        tree = store.create_tree("benchmark")
        branch = store.create_branch(tree["id"], "main")
        members = store.create_leaves(branch.id, leaves)
        samples = {leaf.id: rng.randint(200, 2000) for leaf in members}
        specs = json.dumps([{"dtype": "<f4", "shape": [64, 256]}, {"dtype": "<f4", "shape": [256]}])
        start = time.time() - rounds * 30
        stamp = lambda t: datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="milliseconds")
        with store._tx() as conn:  # one transaction: the benchmark is about reading, not writing
            conn.execute("DELETE FROM rounds WHERE branch_id = ?", (branch.id,))
            for index in range(rounds):
                opened, closed = start + index * 30, start + index * 30 + 25
                aggregate = str(uuid.uuid4())
                conn.execute("INSERT INTO files (id, kind, branch_id, leaf_id, run_number, round_index, path, size,"
                             " sha256, specs, metadata, created_at) VALUES (?, 'aggregate', ?, NULL, 1, ?, ?, ?, ?, ?,"
                             " NULL, ?)", (aggregate, branch.id, index, f"files/{aggregate}.npz", 66_560, "0" * 64,
                                           specs, stamp(closed)))
                conn.execute("INSERT INTO rounds (branch_id, run_number, round_index, status, aggregate_id,"
                             " first_upload_at, opened_at, closed_at) VALUES (?, 1, ?, 'aggregated', ?, ?, ?, ?)",
                             (branch.id, index, aggregate, opened + 1, stamp(opened), stamp(closed)))
                accuracy = 0.5 + 0.45 * (1 - 0.98 ** index)
                for leaf in members:
                    upload = str(uuid.uuid4())
                    uploaded = opened + rng.uniform(1, 24)
                    conn.execute("INSERT INTO files (id, kind, branch_id, leaf_id, run_number, round_index, path,"
                                 " size, sha256, specs, metadata, created_at) VALUES (?, 'upload', ?, ?, 1, ?, ?, ?, ?,"
                                 " ?, NULL, ?)", (upload, branch.id, leaf.id, index, f"files/{upload}.npz", 66_560,
                                                   "0" * 64, specs, stamp(uploaded)))
                    conn.execute("INSERT INTO uploads (branch_id, run_number, round_index, leaf_id, file_id, weighting,"
                                 " uploaded_at) VALUES (?, 1, ?, ?, ?, ?, ?)",
                                 (branch.id, index, leaf.id, upload, samples[leaf.id], stamp(uploaded)))
                    for mode, value in (("test", accuracy + rng.gauss(0, 0.02)), ("train", accuracy + 0.03)):
                        conn.execute("INSERT INTO metrics (id, mode, aggregation_id, leaf_id, branch_id, tree_id, data,"
                                     " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                     (str(uuid.uuid4()), mode, aggregate, leaf.id, branch.id, tree["id"],
                                      json.dumps({"accuracy": value, "loss": 2 * (1 - value)}), stamp(closed + 1)))
            conn.execute("INSERT INTO rounds (branch_id, run_number, round_index, status, opened_at)"
                         " VALUES (?, 1, ?, 'open', ?)", (branch.id, rounds, stamp(start + rounds * 30)))
    finally:
        store.close()
    return branch.id


def visit(browser: Any, url: str, token: str | None) -> dict[str, float]:
    """One visit in a fresh context: seconds from navigation start to each mark the page sets."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, bypass_csp=True)
    try:
        if token:
            context.add_init_script(f"sessionStorage.setItem('branchkey-local-admin-token', {json.dumps(token)})")
        page = context.new_page()
        page.goto(url + "/")
        if not token:
            page.get_by_test_id("login").wait_for()
            return {}
        page.wait_for_function("document.body.dataset.completeAt !== undefined", timeout=60_000)
        plots, rows = page.locator("[data-testid=plot]").count(), page.locator("[data-testid=round-row]").count()
        if plots == 0 or rows == 0:
            raise RuntimeError(f"the page drew {plots} plots and {rows} round rows; expected both")
        marks = page.evaluate("({painted: +document.body.dataset.paintedAt, complete: +document.body.dataset.completeAt,"
                              " fcp: (performance.getEntriesByName('first-contentful-paint')[0] || {}).startTime || 0})")
        return {name: value / 1000 for name, value in marks.items()}
    finally:
        context.close()


def measure(data: Path, repeat: int) -> dict[str, list[float]]:
    """``repeat`` times: a fresh server (empty caches), the page once cold and once warm."""
    from playwright.sync_api import sync_playwright

    token = (data / "admin_token").read_text().strip()
    results: dict[str, list[float]] = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            for _ in range(repeat):
                server = serve(data)
                try:
                    visit(browser, server.url, None)  # the login form: Chromium has the page's files cached
                    for state in ("cold", "warm"):
                        for name, value in visit(browser, server.url, token).items():
                            results.setdefault(f"{state}_{name}_s", []).append(value)
                finally:
                    server.stop()
        finally:
            browser.close()
    return results


def time_routes(url: str, token: str, branch: str, repeat: int) -> dict[str, dict[str, float]]:
    headers = {"Authorization": f"Bearer {token}"}
    out: dict[str, dict[str, float]] = {}
    for path in ("/admin/v1/overview", f"/admin/v1/branches/{branch}/live", f"/admin/v1/branches/{branch}/history",
                 f"/admin/v1/branches/{branch}/metrics/summary"):
        times, size = [], 0
        for _ in range(repeat):
            began = time.perf_counter()
            answer = requests.get(url + path, headers=headers, timeout=60)
            times.append(time.perf_counter() - began)
            answer.raise_for_status()
            size = len(answer.content)
        out[path.replace(branch, "{id}")] = {"cold_s": times[0], "warm_median_s": statistics.median(times[1:] or times),
                                             "bytes": size}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dashboard", description=__doc__.split("\n")[0])
    parser.add_argument("--leaves", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", type=Path, help="where to save the results")
    args = parser.parse_args(argv)
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="bk-dashboard-bench-") as tmp:
        data = Path(tmp) / "data"
        began = time.perf_counter()
        branch = fill_store(data, args.leaves, args.rounds)
        filled_s = time.perf_counter() - began
        browser = measure(data, args.repeat)
        server = serve(data)
        try:
            routes = time_routes(server.url, (data / "admin_token").read_text().strip(), branch, args.repeat)
        finally:
            server.stop()
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "leaves": args.leaves,
              "rounds": args.rounds, "repeat": args.repeat, "fill_s": round(filled_s, 2),
              "load_average": [load_before, load_average()],
              **{name: {"median": statistics.median(v), "max": max(v)} for name, v in browser.items()},
              "routes": routes}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
