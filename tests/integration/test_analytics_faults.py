"""Analytics rounds under faults: a server killed with -9 between two uploads loses neither, and the round's
combination is made again from its files; the CLI sets a live server's field operations and `status` shows the result."""

from __future__ import annotations

import json

import numpy as np
import requests

from branchkey_integrations.core import wire
from tests.conftest import cli, wait_until


def upload(server, creds: dict, fields: dict) -> requests.Response:
    return requests.post(server.url + "/api/v1/file/upload", files={"file": ("a.npz", wire.prepare_fields(fields).getvalue())},
                         data={"data": json.dumps({"leaf_name": creds["name"], "metadata": "{}"})},
                         headers={"Authorization": f"Bearer {creds['id']}:{creds['session_token']}"}, timeout=30)


def latest(server, creds: dict) -> dict | None:
    answer = requests.get(f"{server.url}/api/v1/round/{creds['branch_id']}", timeout=10,
                          headers={"Authorization": f"Bearer {creds['id']}:{creds['session_token']}"})
    return ((answer.json()["data"]["analytics"]) or {}).get("latest_aggregate")


def fetch(server, creds: dict, file_id: str) -> wire.Archive:
    answer = requests.get(f"{server.url}/api/v1/file/download/{file_id}", timeout=10,
                          headers={"Authorization": f"Bearer {creds['id']}:{creds['session_token']}"})
    return wire.decode(requests.get(answer.json()["data"]["download_url"], timeout=10).content)


def test_a_kill_9_between_uploads_loses_no_accepted_analytics_upload(server_factory) -> None:
    server, files = server_factory(2)
    leaves = [json.loads(path.read_text()) for path in files]
    cli("branch", "--data-dir", str(server.data_dir), "--field-op", "labels=sum", "--field-op", "size=must_match")
    first = upload(server, leaves[0], {"labels": np.array([1, 2], np.int64), "size": np.array([8, 8]),
                                       "x_n": np.array([2], np.int64), "x_sum": np.array([3.5])})
    assert first.status_code == 201, first.text
    server.kill()
    server.start()
    refused = upload(server, leaves[1], {"labels": np.array([5, 5], np.int64), "size": np.array([8, 9]),
                                         "x_n": np.array([1], np.int64), "x_sum": np.array([1.0])})
    assert refused.status_code == 400 and "must_match) differs from the value leaf_1 sent" in refused.json()["error"]
    second = upload(server, leaves[1], {"labels": np.array([5, 5], np.int64), "size": np.array([8, 8]),
                                        "x_n": np.array([1], np.int64), "x_sum": np.array([1.0])})
    assert second.status_code == 201, second.text
    combined = wait_until(lambda: latest(server, leaves[0]), 30, "the analytics round to combine")
    assert combined["contributors"] == 2 and (combined["run_number"], combined["round_index"]) == (1, 0)
    fields = fetch(server, leaves[1], combined["aggregation_id"]).fields
    assert {name: value.tolist() for name, value in fields.items()} == {
        "labels": [6, 7], "size": [8, 8], "x_n": [3], "x_sum": [4.5]}
    status = cli("status", "--data-dir", str(server.data_dir)).stdout
    assert "latest analytics result: run 1 analytics round 1, 2 leaves" in status
