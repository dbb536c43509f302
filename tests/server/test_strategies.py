"""Server strategies against direct NumPy computations: the robust ones on in-memory uploads, the server
optimizers through a real server over several rounds (the moments then matter), and parameter checks."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from branchkey_integrations.core import wire
from branchkey_integrations.core.errors import InvalidValueError
from branchkey_integrations.core.wire import LayerSpec
from branchkey_integrations.server.strategies import CATALOGUE, Median, TrimmedMean, check_strategy

from .conftest import Handle


class Upload:
    def __init__(self, weighting: float, layers: list[np.ndarray]) -> None:
        self.weighting, self.layers = weighting, layers

    def read_layer(self, index: int) -> np.ndarray:
        return self.layers[index]


def random_uploads(rng: np.random.Generator, count: int, dtype: Any, shape: tuple[int, ...] = (5, 3)) -> list[Upload]:
    return [Upload(float(rng.uniform(0.5, 50)), [rng.normal(size=shape).astype(dtype)]) for _ in range(count)]


def run(strategy: Any, uploads: list[Upload]) -> np.ndarray:
    [layer] = strategy.aggregate(uploads, [LayerSpec.of(uploads[0].layers[0])])
    return layer


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("count", [1, 2, 5, 6])
def test_median_is_numpys_unweighted_median(dtype: Any, count: int) -> None:
    uploads = random_uploads(np.random.default_rng(count), count, dtype)
    expected = np.median(np.stack([u.layers[0].astype(np.float64) for u in uploads]), axis=0).astype(dtype)
    got = run(Median(), uploads)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, expected)


def test_median_ties_and_an_even_count() -> None:
    values = [[1.0, 5.0], [1.0, 2.0], [3.0, 2.0], [1.0, 7.0]]
    uploads = [Upload(w, [np.array(v, np.float32)]) for w, v in zip((1, 1000, 1, 1), values)]
    assert run(Median(), uploads).tolist() == [1.0, 3.5]  # the weighting of 1000 moves nothing


def test_median_of_integer_layers_rounds_half_to_even() -> None:
    uploads = [Upload(1.0, [np.array([v], np.int64)]) for v in (1, 2, 4, 9)]
    assert run(Median(), uploads).tolist() == [3]  # median 3.0
    uploads = [Upload(1.0, [np.array([v], np.int64)]) for v in (1, 2)]
    assert run(Median(), uploads).tolist() == [2]  # 1.5 rounds to 2, half to even


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize(("beta", "count"), [(0.1, 10), (0.2, 7), (0.3, 6), (0.0, 4), (0.45, 20)])
def test_trimmed_mean_is_numpys(dtype: Any, beta: float, count: int) -> None:
    uploads = random_uploads(np.random.default_rng(count), count, dtype)
    stack = np.sort(np.stack([u.layers[0].astype(np.float64) for u in uploads]), axis=0)
    cut = math.floor(beta * count)
    expected = stack[cut:count - cut].mean(axis=0).astype(dtype)
    np.testing.assert_array_equal(run(TrimmedMean(beta), uploads), expected)


def test_trimmed_mean_cuts_an_outlier_at_each_end() -> None:
    uploads = [Upload(1.0, [np.array([v], np.float64)]) for v in (-1e9, 1.0, 2.0, 3.0, 1e9)]
    assert run(TrimmedMean(0.2), uploads).tolist() == [2.0]


def test_robust_strategies_read_one_layer_of_every_upload_at_a_time() -> None:
    reads: list[tuple[int, int]] = []

    class Logged(Upload):
        def read_layer(self, index: int) -> np.ndarray:
            reads.append((index, id(self)))
            return self.layers[index]

    uploads = [Logged(1.0, [np.full(2, k, np.float32), np.full(3, -k, np.float32)]) for k in range(4)]
    specs = [LayerSpec.of(layer) for layer in uploads[0].layers]
    for strategy in (Median(), TrimmedMean(0.25)):
        reads.clear()
        layers = strategy.aggregate(uploads, specs)
        first = next(layers)
        assert [index for index, _ in reads] == [0] * 4  # layer 1 of no upload read before layer 0 is done
        assert first.tolist() == [1.5, 1.5] and next(layers).tolist() == [-1.5, -1.5, -1.5]


def test_complex_layers_take_the_median_of_each_part() -> None:
    values = [1 + 5j, 2 + 1j, 9 + 2j]
    uploads = [Upload(1.0, [np.array([v], np.complex64)]) for v in values]
    assert run(Median(), uploads).tolist() == [2 + 2j]


# -- parameters --------------------------------------------------------------------------------


def test_defaults_fill_what_is_not_given() -> None:
    assert check_strategy("fedavg") == {}
    assert check_strategy("fedavgm") == {"eta": 1.0, "momentum": 0.9}
    assert check_strategy("fedyogi", {"tau": 1e-6}) == {"eta": 0.01, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-6}
    assert check_strategy("fedadagrad") == {"eta": 0.1, "tau": 1e-3}
    assert check_strategy("trimmed-mean", {"beta": 0}) == {"beta": 0.0}


@pytest.mark.parametrize(("name", "params", "named"), [
    ("fedadam", {"eta": -0.1}, "eta=-0.1"), ("fedadam", {"eta": 0}, "eta=0"),
    ("fedavgm", {"momentum": 1.0}, "momentum=1.0"), ("fedyogi", {"beta_2": -0.5}, "beta_2=-0.5"),
    ("fedadam", {"tau": 0.0}, "tau=0.0"), ("trimmed-mean", {"beta": 0.5}, "beta=0.5"),
    ("trimmed-mean", {"beta": -0.1}, "beta=-0.1"), ("fedadam", {"eta": float("nan")}, "eta=nan"),
    ("fedadam", {"eta": "fast"}, "eta='fast'"), ("fedadam", {"eta": True}, "eta=True"),
])
def test_a_value_out_of_range_is_refused_naming_it_and_the_range(name: str, params: dict, named: str) -> None:
    with pytest.raises(InvalidValueError) as caught:
        check_strategy(name, params)
    assert named in str(caught.value) and f"{name}'s" in str(caught.value)
    key = next(iter(params))
    assert CATALOGUE[name][key].allowed() in str(caught.value)


def test_unknown_names_are_refused_listing_the_known_ones() -> None:
    with pytest.raises(InvalidValueError, match=r"no parameter 'lr'; its parameters are \['beta_1', 'beta_2', 'eta', 'tau'\]"):
        check_strategy("fedadam", {"lr": 0.1})
    with pytest.raises(InvalidValueError, match="no parameter 'beta'; its parameters are none"):
        check_strategy("median", {"beta": 0.1})
    with pytest.raises(InvalidValueError, match=r"Expected a strategy in \[.*'trimmed-mean'\]. Received: strategy='krum'"):
        check_strategy("krum")


# -- server optimizers, through the real server ------------------------------------------------


def numpy_mean(layers: list[np.ndarray], weightings: list[float]) -> np.ndarray:
    """The FedAvg mean as the running sum computes it: float64 sum in commit order over the weightings' sum
    (one upload: that upload, exactly)."""
    if len(layers) == 1:
        return layers[0]
    total = np.zeros(layers[0].shape, np.float64)
    for layer, weighting in zip(layers, weightings):
        total += np.multiply(layer, weighting, dtype=np.float64)
    mean = total / math.fsum(weightings)
    return (np.rint(mean) if layers[0].dtype.kind == "i" else mean).astype(layers[0].dtype)


def numpy_step(name: str, p: dict[str, float], x: np.ndarray, mean: np.ndarray, m: np.ndarray, v: np.ndarray):
    d = mean.astype(np.float64) - x.astype(np.float64)
    if name == "fedavgm":
        m = p["momentum"] * m + d
        return x + p["eta"] * m, m, v
    if name == "fedadagrad":
        v = v + d ** 2
        return x + p["eta"] * d / (np.sqrt(v) + p["tau"]), m, v
    m = p["beta_1"] * m + (1 - p["beta_1"]) * d
    if name == "fedadam":
        v = p["beta_2"] * v + (1 - p["beta_2"]) * d ** 2
    else:
        v = v - (1 - p["beta_2"]) * d ** 2 * np.sign(v - d ** 2)
    return x + p["eta"] * m / (np.sqrt(v) + p["tau"]), m, v


def play_rounds(live: Handle, branch: dict[str, Any], leaves: list[dict[str, str]], rounds: list[list[tuple]],
                start: int = 0) -> list[wire.Archive]:
    """Upload each round's ``(layers, weighting)`` per leaf in order; return every round's aggregate."""
    results = []
    for index, uploads in enumerate(rounds, start):
        for leaf, (layers, weighting) in zip(leaves, uploads):
            assert live.upload(leaf, wire.encode(layers, weighting)).status_code == 201
        results.append(live.fetch(leaves[0], live.wait_aggregate(branch["id"], index=index)))
    return results


def random_rounds(seed: int, count: int, leaves: int, dtype: Any = np.float32) -> list[list[tuple]]:
    rng = np.random.default_rng(seed)
    return [[([rng.normal(size=(4, 3)).astype(dtype), np.array([r, k], np.int64)], float(rng.uniform(1, 30)))
             for k in range(leaves)] for r in range(count)]


def numpy_run(name: str, params: dict[str, float], rounds: list[list[tuple]]) -> list[list[np.ndarray]]:
    """The aggregates a server optimizer should produce: round 0 the mean, then steps (float layers only)."""
    means = [[numpy_mean([u[0][i] for u in uploads], [u[1] for u in uploads]) for i in range(2)] for uploads in rounds]
    x, m, v = means[0][0], 0.0, 0.0
    results = [means[0]]
    for mean, counter in means[1:]:
        stepped, m, v = numpy_step(name, params, x, mean, m, v)
        x = stepped.astype(mean.dtype)
        results.append([x, counter])
    return results


@pytest.mark.parametrize(("name", "leaves", "dtype"), [
    ("fedavgm", 3, np.float32), ("fedadam", 3, np.float32), ("fedyogi", 2, np.float32), ("fedadagrad", 3, np.float32),
    ("fedadam", 3, np.float16), ("fedyogi", 3, np.float64), ("fedadam", 1, np.float64)])
def test_server_optimizers_match_numpy_over_rounds(live: Handle, name: str, leaves: int, dtype: Any) -> None:
    params = check_strategy(name, {"eta": 0.3})
    branch, credentials = live.make_branch(leaves, strategy=name, strategy_params={"eta": 0.3})
    assert branch["algorithm"] == name and branch["strategy_params"] == params
    rounds = random_rounds(7, 4, leaves, dtype)
    for got, expected in zip(play_rounds(live, branch, credentials, rounds), numpy_run(name, params, rounds)):
        for layer, reference in zip(got.layers, expected):
            assert layer.dtype == reference.dtype
            np.testing.assert_array_equal(layer, reference)
    recorded = live.rounds(branch["id"])
    assert [r["strategy"] for r in recorded[:4]] == ["fedavg", name, name, name]
    assert "first round of run 1" in recorded[0]["strategy_note"] and recorded[1]["strategy_note"] is None


def test_median_branch_aggregates_unweighted(live: Handle) -> None:
    branch, leaves = live.make_branch(3, strategy="median")
    rounds = [[([np.array([v, 10 * v], np.float32)], w)] for v, w in ((0.0, 1.0), (1.0, 1000.0), (5.0, 1.0))]
    [got] = play_rounds(live, branch, leaves, [[u[0] for u in rounds]])
    assert got.layers[0].tolist() == [1.0, 10.0]
    assert live.rounds(branch["id"])[0]["strategy"] == "median"


def test_an_optimizer_step_past_the_layer_dtype_names_eta_and_the_fix(tmp_path) -> None:
    """fedavgm with a huge eta on a float16 layer overflows: the error names eta and how to lower it."""
    from branchkey_integrations.core.errors import AggregationError
    from branchkey_integrations.server.strategies import apply_optimizer

    previous, mean = tmp_path / "previous.npz", tmp_path / "mean.npz"
    previous.write_bytes(wire.encode([np.zeros(3, np.float16)], compression="none"))
    mean.write_bytes(wire.encode([np.full(3, 100, np.float16)], compression="none"))
    params = check_strategy("fedavgm", {"eta": 1e4, "momentum": 0.0})
    with pytest.raises(AggregationError, match=r"eta=10000.*--strategy-param eta="):
        apply_optimizer("fedavgm", params, mean, previous, None, tmp_path / "out.npz", tmp_path / "m.npz", None,
                        [LayerSpec((3,), np.dtype(np.float16))])
