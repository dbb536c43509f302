"""A small user script, type-checked by tests/test_typing.py with mypy --strict: what a user who types
their code writes against the public API (the core client, Federation, both callbacks' constructors).
It is never run: it only has to type-check."""

from __future__ import annotations

import numpy as np

from branchkey_integrations import AggregationTimeoutError, AnalyticsResult, BranchKeyError, Client
from branchkey_integrations.core.federation import Federation
from branchkey_integrations.core.outcome import Outcome
from branchkey_integrations.keras import BranchKeyKerasCallback
from branchkey_integrations.lightning import BranchKeyCallback

HOST = "http://127.0.0.1:8080"


def one_round_with_the_client(weights: list[np.ndarray], samples: int) -> list[np.ndarray]:
    with Client("leaf_1.json", host=HOST, transport="websocket", timeout=10.0) as client:
        file_id: str = client.upload_weights(weighting=samples, parameters=weights)
        try:
            aggregation_id: str = client.wait_for_aggregation(timeout=600)
        except AggregationTimeoutError:
            return weights
        aggregate = client.download_aggregate(aggregation_id)
        client.send_performance_metrics(aggregation_id, {"accuracy": 0.91}, mode="test")
        latest: str | None = client.get_latest_aggregation_id()
        print(file_id, latest, client.run_status, client.run_number)
        return list(aggregate.layers)


def one_round_with_federation(weights: list[np.ndarray]) -> bool:
    federation = Federation({"id": "..."}, HOST, timeout=60.0, on_timeout="continue", log_every_s=5.0)
    try:
        outcome: Outcome = federation.exchange(weights, 120)
    except BranchKeyError:
        return False
    finally:
        federation.close()
    return outcome.kind == "done"


def analytics(ages: np.ndarray, histogram: np.ndarray) -> float:
    with Client("leaf_1.json", host=HOST) as client:
        path: str = client.save_analytics({"age": ages}, nan_policy="raise")
        client.file_upload(path)
        result: AnalyticsResult = client.download_analytics(client.wait_for_analytics(timeout=60.0))
        client.upload_fields({"labels": histogram})
    federation = Federation("leaf_1.json", HOST)
    pooled = federation.analytics_round(columns={"age": ages}, fields={"labels": histogram}, timeout=600.0)
    print(result.table(), pooled.contributors, pooled.fields["labels"])
    return pooled.statistics["age"].variance


def callbacks() -> tuple[BranchKeyCallback, BranchKeyKerasCallback]:
    lightning = BranchKeyCallback("leaf_1.json", host=HOST, every_n_epochs=2, timeout=None, on_timeout="raise",
                                  buffers="local", snapshot_dir="snapshots", transport="auto", log_every_s=30.0,
                                  proximal_mu=0.01)
    keras = BranchKeyKerasCallback("leaf_2.json", host=HOST, num_samples=lambda: 128, every_n_epochs=1,
                                   reset_optimizer=True, client_options={"ssl": False}, proximal_mu=0.1)
    return lightning, keras
