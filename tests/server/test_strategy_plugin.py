"""A strategy added from outside the package: one class, registered, runs rounds through the real server
(the contributing guide's worked example among them).

Also: the robust strategies do no running-sum work (their uploads are answered once committed), and the
round state machine names no strategy.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pytest

from branchkey_integrations.core.errors import InvalidValueError
from branchkey_integrations.core.protocol import OPENAPI_PATH
from branchkey_integrations.core.wire import LayerSpec
from branchkey_integrations.server import aggregation, rounds
from branchkey_integrations.server.aggregation import Combiner, LayerReader, aggregate_files
from branchkey_integrations.server.strategies import CoordinateWise
from branchkey_integrations.server.strategy import (
    CATALOGUE,
    STRATEGIES,
    Combined,
    Param,
    RoundInputs,
    Strategy,
    register_strategy,
    unregister_strategy,
)

from .conftest import Handle
from .test_strategies import play_rounds


class Quantile(CoordinateWise):
    """Per coordinate, the q-quantile of the uploads' values (unweighted); reads the uploads at the end."""

    name = "toy-quantile"
    summary = "the coordinate-wise q-quantile (unweighted)"
    parameters = {"q": Param(0.5, 0, 1, True, "which quantile: 0 the minimum, 0.5 the median")}

    def reduce(self, stack: np.ndarray) -> np.ndarray:
        return np.quantile(stack, self.params["q"], axis=0)


class Shrunk(Strategy):
    """The weighted mean scaled by ``factor``: folds on arrival and starts from the running sum's mean."""

    name = "toy-shrunk"
    summary = "the weighted mean times factor"
    parameters = {"factor": Param(0.5, 0, 1, meaning="what the mean is multiplied by")}

    def combine(self, round_: RoundInputs) -> Combined:
        destination = round_.store.new_temp_path()
        round_.temps.append(destination)
        scaled = _Scaled(self.params["factor"])
        size, digest = aggregate_files([(round_.destination, 1.0)], round_.specs, destination, scaled)
        return Combined(destination, size, digest, self.name)


class _Scaled(Combiner):
    def __init__(self, factor: float) -> None:
        self.factor = factor

    def aggregate(self, readers: Sequence[LayerReader], specs: Sequence[LayerSpec]) -> Iterator[np.ndarray]:
        [mean] = readers
        for index, spec in enumerate(specs):
            yield (mean.read_layer(index) * self.factor).astype(spec.dtype)


@pytest.fixture
def toys() -> Iterator[None]:
    for cls in (Quantile, Shrunk):
        register_strategy(cls)
    yield
    for cls in (Quantile, Shrunk):
        unregister_strategy(cls.name)


@pytest.fixture
def fold_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The leaves whose uploads the running sum folded (a spy on the real method)."""
    calls: list[str] = []
    add = aggregation.RunningSum._add

    def spied(self: aggregation.RunningSum, leaf: str, *args: Any) -> None:
        calls.append(leaf)
        add(self, leaf, *args)

    monkeypatch.setattr(aggregation.RunningSum, "_add", spied)
    return calls


def test_a_strategy_registered_from_outside_runs_rounds_through_the_server(live: Handle, toys: None,
                                                                         fold_calls: list[str]) -> None:
    assert "toy-quantile" in CATALOGUE and CATALOGUE["toy-quantile"]["q"].default == 0.5
    branch, leaves = live.make_branch(3, strategy="toy-quantile", strategy_params={"q": 0.25})
    assert (branch["algorithm"], branch["strategy_params"]) == ("toy-quantile", {"q": 0.25})
    rounds_ = [[([np.array([v, -v], np.float32)], w) for v, w in ((0.0, 1.0), (4.0, 500.0), (8.0, 1.0))],
               [([np.array([v, 2 * v], np.float32)], 1.0) for v in (1.0, 3.0, 9.0)]]
    got = play_rounds(live, branch, leaves, rounds_)
    assert got[0].layers[0].tolist() == [2.0, -6.0]  # the 0.25-quantiles, unweighted
    assert got[1].layers[0].tolist() == [2.0, 4.0]
    assert [r["strategy"] for r in live.rounds(branch["id"])[:2]] == ["toy-quantile"] * 2
    assert fold_calls == []  # it folds nothing: no running-sum work for its uploads

    document = live.session.get(live.url + OPENAPI_PATH, timeout=10).json()
    assert "toy-quantile" in document["components"]["schemas"]["Branch"]["properties"]["algorithm"]["enum"]

    folding, (a, b) = live.make_branch(2, strategy="toy-shrunk")
    [shrunk] = play_rounds(live, folding, [a, b], [[([np.full(2, 2.0, np.float32)], 1.0),
                                                   ([np.full(2, 6.0, np.float32)], 3.0)]])
    assert shrunk.layers[0].tolist() == [2.5, 2.5]  # the weighted mean 5.0, times the default factor 0.5
    assert set(fold_calls) == {a["id"], b["id"]}  # folded on arrival, as fedavg is


def test_the_contributing_guides_example_strategy_runs_a_round(live: Handle) -> None:
    readme = (Path(__file__).parents[2] / "docs" / "contributing.md").read_text(encoding="utf-8")
    [block] = re.findall(r"^```python\n(# A strategy in one file.*?)^```", readme, re.M | re.S)
    namespace: dict[str, Any] = {}
    exec(compile(block, "docs/contributing.md", "exec"), namespace)  # registers it
    try:
        assert STRATEGIES["quantile"] is namespace["Quantile"]
        branch, leaves = live.make_branch(3, strategy="quantile", strategy_params={"q": 0})
        [got] = play_rounds(live, branch, leaves, [[([np.array([v], np.float64)], 1.0) for v in (5.0, -2.0, 7.0)]])
        assert got.layers[0].tolist() == [-2.0]  # q=0: the minimum
    finally:
        unregister_strategy("quantile")


def test_a_registered_strategys_parameters_are_checked_where_any_are(live: Handle, toys: None) -> None:
    tree = live.admin("POST", "/admin/v1/trees", {"name": "t"}, expect=201)
    refused = live.admin("POST", f"/admin/v1/trees/{tree['id']}/branches",
                         {"name": "b", "strategy": "toy-quantile", "strategy_params": {"q": 1.5}}, expect=400)
    assert "toy-quantile's q in [0, 1)" in refused["error"] and "q=1.5" in refused["error"]
    with pytest.raises(InvalidValueError, match="toy-shrunk's factor"):
        Shrunk(factor=0)


def test_the_cli_offers_a_registered_strategy_with_its_summary(toys: None, capsys: pytest.CaptureFixture) -> None:
    from branchkey_integrations.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["branch", "strategy", "toy-quantile", "--strategy-param", "q=0.2", "--data-dir", "d"])
    assert (args.strategy, args.strategy_param) == ("toy-quantile", [("q", 0.2)])
    with pytest.raises(SystemExit):
        parser.parse_args(["init", "--help"])
    shown = "".join(capsys.readouterr().out.split())  # argparse wraps lines (and at hyphens)
    assert "toy-quantile:thecoordinate-wiseq-quantile(unweighted)" in shown and "q=0.5in[0,1)" in shown


def test_a_name_is_registered_once_and_unregistered_strategies_are_gone(toys: None) -> None:
    class Impostor(Quantile):
        pass

    with pytest.raises(InvalidValueError, match="toy-quantile"):
        register_strategy(Impostor)
    assert STRATEGIES["toy-quantile"] is Quantile
    unregister_strategy("toy-quantile")
    assert "toy-quantile" not in CATALOGUE


@pytest.mark.parametrize(("name", "params"), [("median", {}), ("trimmed-mean", {"beta": 0.25})])
def test_robust_strategies_fold_nothing(live: Handle, fold_calls: list[str], name: str, params: dict) -> None:
    """Their 201s do not wait for folds into a running sum they never read (they used to fold every upload)."""
    branch, leaves = live.make_branch(4, strategy=name, strategy_params=params)
    values = (0.0, 1.0, 2.0, 100.0)
    [got] = play_rounds(live, branch, leaves, [[([np.array([v], np.float32)], 1.0) for v in values]])
    assert got.layers[0].tolist() == [1.5]
    assert fold_calls == []


def test_a_trimmed_mean_too_small_to_trim_still_takes_the_weighted_mean(live: Handle,
                                                                       fold_calls: list[str]) -> None:
    """It folds nothing on arrival, and its fallback makes the running sum's mean at the end."""
    branch, leaves = live.make_branch(2, strategy="trimmed-mean")
    [got] = play_rounds(live, branch, leaves, [[([np.array([0.0], np.float32)], 1.0),
                                                ([np.array([4.0], np.float32)], 3.0)]])
    assert got.layers[0].tolist() == [3.0]
    assert live.rounds(branch["id"])[0]["strategy"] == "fedavg"
    assert len(fold_calls) == 2  # both folded once, by the aggregation


def test_the_round_state_machine_names_no_strategy() -> None:
    source = Path(rounds.__file__).read_text()
    named = {node.value for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Constant)} & set(STRATEGIES)
    assert not named, f"rounds.py branches on strategy names {sorted(named)}; ask the strategy instead"
