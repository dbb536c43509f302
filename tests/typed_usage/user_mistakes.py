"""Mistakes tests/test_typing.py expects mypy to catch through the package's own hints (py.typed).
Each line marked ``# error: <code>`` must be reported with that error code, and nothing else."""

from __future__ import annotations

from branchkey_integrations import Client
from branchkey_integrations.keras import BranchKeyKerasCallback

client = Client("leaf_1.json", host=8080)  # error: arg-type
aggregation_id: int = client.wait_for_aggregation()  # error: assignment
client.upload_weights("many", [])  # error: arg-type
BranchKeyKerasCallback("leaf_1.json", num_sample=10)  # error: call-arg
