"""One round numbering wherever a person reads it (issue 28): a Lightning leaf's own lines, ``branchkey-local
status`` (text and ``--json``) and the dashboard (its API and its page) call the same round "round N", counted
from 1 within the run; the protocol's 0-based ``round_index`` stays in the JSON under its own name. A run whose
leaves are done reads as waiting for its next round's first upload, not as a round that every leaf is missing.
"""

from __future__ import annotations

import json
import re
import threading

import numpy as np
import requests
import torch
from playwright.sync_api import expect

from branchkey_integrations.core.federation import Federation
from branchkey_integrations.lightning import federated_tensors

from ..conftest import cli
from ..lightning.models import TinyModel, loader, trainer
from ..lightning.test_rounds import callback_for

ROUNDS = 2


class ScoredModel(TinyModel):
    """TinyModel with a validation loss: the callback sends it after each round, and the dashboard plots it."""

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self(x), y))


def test_a_round_has_one_number_in_the_callback_status_and_the_dashboard(server_factory, caplog, page):
    server, credentials = server_factory(2)
    partner = Federation(credentials[1], host=server.url, transport="websocket", timeout=60)
    partner.connect()
    arrays = [np.full(t.shape, 0.5, np.float32) for _, t in federated_tensors(TinyModel())]
    failures: list[BaseException] = []

    def partner_rounds() -> None:
        try:
            for _ in range(ROUNDS):
                partner.run_round(arrays, 24.0)
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    thread = threading.Thread(target=partner_rounds, daemon=True)
    thread.start()
    try:
        with caplog.at_level("INFO"):
            trainer([callback_for(credentials[0], server)], max_epochs=ROUNDS).fit(
                ScoredModel(), loader(8, 0), val_dataloaders=loader(8, 1))
        thread.join(60)
    finally:
        partner.close()
    assert not failures and partner.round == ROUNDS

    # the callback: "round 1 of run 1 done", "round 2 of run 1 done" (it used to say "Round 3 (run 1, round index 2)")
    said = re.findall(r"BranchKey: round (\d+) of run (\d+) done", caplog.text)
    assert said == [("1", "1"), ("2", "1")], caplog.text
    assert "round index" not in caplog.text

    # status --json: "round" from 1 beside the protocol's round_index; the next round waits, it is not stuck
    [branch] = json.loads(cli("status", "--data-dir", str(server.data_dir), "--json").stdout)["branches"]
    aggregated = [r for r in branch["rounds"] if r["status"] == "aggregated"]
    assert [(r["round"], r["round_index"]) for r in aggregated] == [(1, 0), (2, 1)]
    progress = branch["progress"]
    assert (progress["round"], progress["round_index"], progress["aggregated"]) == (ROUNDS + 1, ROUNDS, ROUNDS)
    assert progress["state"] == f"round {ROUNDS + 1} of run 1 waits for its first upload ({ROUNDS} aggregated)"
    assert branch["metrics"]["latest"]["test/val_loss"]["round"] == ROUNDS
    assert [s["round_numbers"] for s in branch["metrics"]["series"] if s["metric"] == "val_loss"] == [[1, 2]]
    text = cli("status", "--data-dir", str(server.data_dir)).stdout
    assert f"  run 1 round {ROUNDS}: aggregated" in text and "missing" not in text, text

    # the dashboard's API and page: the same numbers
    token = (server.data_dir / "admin_token").read_text().strip()
    live = requests.get(f"{server.url}/admin/v1/branches/{branch['id']}/live",
                        headers={"Authorization": f"Bearer {token}"}, timeout=10).json()["data"]
    assert (live["round"], live["state"]) == (progress["round"], progress["state"])
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.goto(server.url + "/")
    page.fill("#token", token)
    page.click("#login-form button")
    expect(page.get_by_test_id("round-title")).to_have_text(f"Open round {ROUNDS + 1} of run 1 (start)")
    expect(page.get_by_test_id("round-facts")).to_contain_text(progress["state"])
    expect(page.get_by_test_id("round-facts")).to_contain_text(f"latest aggregate: round {ROUNDS} of run 1")
    assert "missing" not in page.get_by_test_id("round-facts").inner_text()
    expect(page.get_by_test_id("round-number")).to_have_text([str(n) for n in range(ROUNDS, 0, -1)])
    expect(page.get_by_test_id("open-round")).to_have_text(f"round {ROUNDS + 1}: 0/2")
    # the plot: its x axis counts rounds from 1, and its legend shows the latest round's values before any hover
    plot = page.locator("[data-testid=plot][data-metric='test/val_loss']")
    expect(plot).to_have_attribute("data-rounds", str(ROUNDS))
    values = plot.locator(".u-legend .u-value").all_inner_texts()
    assert values and values[0] == str(ROUNDS) and "--" not in values, values
    assert not errors, errors
