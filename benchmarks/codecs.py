"""The float codecs measured: bytes per codec on trained weights, the client's extra memory while encoding, and a
loopback round with the lossless codec against the stored default.

Models: the simulation's MLP (64-256-10) trained on the digits data as ``simulate`` does, and a ResNet-18 (11.5M
float32 parameters) after a few SGD steps on random images. Bytes per round (up + down) are given two ways:
the download as today's float32 aggregate, and the download in the same codec (what an aggregate served
encoded would cost). Delta uploads (``delta``): the trained weights sent as the XOR of their bits with the model
they started from (the MLP after 4 of its 5 rounds; the ResNet at initialisation), shuffle-zstd and deflate,
against deflate level 1 of the full weights.

Run: ``python -m benchmarks.codecs [--out FILE] [--rounds N] [--bytes-only]`` (needs torch and scikit-learn;
shuffle-zstd needs the [zstd] extra).
"""

from __future__ import annotations

import argparse
import json
import time
import tracemalloc
from pathlib import Path

import numpy as np

from branchkey_integrations import Client
from branchkey_integrations.core import wire
from branchkey_integrations.core.codec_choice import ErrorFeedback
from branchkey_integrations.core.delta import DeltaBase, xor_bits
from branchkey_integrations.core.float_codecs import INT8, SHUFFLE_ZSTD

from .common import load_average, local_server, median, save_report

CODECS = ["none", "deflate", "shuffle-zstd", "fp16", "bf16", "int8"]


def trained_mlp() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The MLP after 4 rounds (the global model a leaf starts its 5th from) and after 5 (what it uploads)."""
    import torch
    from sklearn.datasets import load_digits
    from torch import nn

    torch.manual_seed(0)
    digits = load_digits()
    x, y = torch.tensor(digits.data / 16, dtype=torch.float32), torch.tensor(digits.target)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    base: list[np.ndarray] = []
    for epoch in range(25):  # 5 rounds x 5 epochs, full batch
        if epoch == 20:
            base = [p.detach().numpy().copy() for p in model.state_dict().values()]
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return base, [p.detach().numpy().copy() for p in model.state_dict().values()]


def resnet18_after_steps(steps: int = 3) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The ResNet-18 at initialisation (the global model) and after ``steps`` SGD steps (what a leaf uploads)."""
    import torch
    from torch import nn

    def block(cin: int, cout: int, stride: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                             nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))

    torch.manual_seed(0)
    layers, channels = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU()], 64
    for width, stride in [(64, 1), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1)]:
        layers.append(block(channels, width, stride))
        channels = width
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 1000))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    base = [p.detach().numpy().copy() for p in model.state_dict().values() if p.dtype == torch.float32]
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(8, 3, 64, 64)), torch.randint(0, 1000, (8,))).backward()
        optimizer.step()
    return base, [p.detach().numpy().copy() for p in model.state_dict().values() if p.dtype == torch.float32]


def delta_bytes(base: list[np.ndarray], layers: list[np.ndarray]) -> dict:
    """The upload as the XOR of its bits with ``base`` (what a delta upload sends), against deflate 1 of the weights."""
    deflate = wire.prepare(layers, 1.0, compression="deflate").size
    bits = [xor_bits(layer, held) for layer, held in zip(layers, base)]
    out: dict = {"deflate_1_full_bytes": deflate}
    for codec in ("deflate", "shuffle-zstd"):
        if codec == "shuffle-zstd" and SHUFFLE_ZSTD is None:
            continue
        started = time.perf_counter()
        size = wire.prepare(bits, 1.0, compression=codec).size
        out[f"xor_{codec}"] = {"bytes": size, "of_float32": round(size / sum(a.nbytes for a in layers), 4),
                               "fewer_bytes_than_deflate_1": round(1 - size / deflate, 4),
                               "encode_s": round(time.perf_counter() - started, 4)}
    return out


def codec_bytes(layers: list[np.ndarray]) -> dict:
    float32 = wire.prepare(layers, 1.0, compression="none").size
    out: dict = {"float32_bytes": float32, "parameters": int(sum(a.size for a in layers))}
    for codec in CODECS:
        if codec == "shuffle-zstd" and SHUFFLE_ZSTD is None:
            continue
        started = time.perf_counter()
        size = wire.prepare(layers, 1.0, compression=codec).size
        seconds = time.perf_counter() - started
        aggregate = wire.prepare(layers, None, compression=codec).size  # an aggregate has no weighting member
        out[codec] = {"bytes": size, "of_float32": round(size / float32, 4), "encode_s": round(seconds, 4),
                      "round_trip_download_float32": round((size + float32) / (2 * float32), 4),
                      "round_trip_download_encoded": round((size + aggregate) / (2 * float32), 4)}
    if "shuffle-zstd" in out:
        out["shuffle_zstd_fewer_bytes_than_deflate_1"] = round(1 - out["shuffle-zstd"]["bytes"] / out["deflate"]["bytes"], 4)
    return out


def encoding_memory(layers: list[np.ndarray], base: list[np.ndarray]) -> dict:
    """Peak bytes allocated (tracemalloc: NumPy reports its buffers) while encoding, over the model's bytes; the delta
    rows encode the difference from ``base`` (held before, as a client holds the aggregate it downloaded)."""
    model = sum(a.nbytes for a in layers)
    result = {}
    for codec, lossy in (("shuffle-zstd", False), ("int8", True)):
        if codec == "shuffle-zstd" and SHUFFLE_ZSTD is None:
            continue
        held = DeltaBase("auto")
        held.remember("base", base, download_codec=None, branch_takes=lambda: True)
        tracemalloc.start()
        sent, _ = held.difference(layers, lossy=lossy)
        archive = wire.prepare(sent, 1.0, compression=codec)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        del archive, sent
        result[f"{codec} delta"] = {"peak_extra_bytes": peak, "of_model": round(peak / model, 3)}
    for codec in ("none", "shuffle-zstd", "fp16", "int8", "int8+error-feedback"):
        if codec == "shuffle-zstd" and SHUFFLE_ZSTD is None:
            continue
        feedback = ErrorFeedback()
        if codec.endswith("feedback"):
            feedback.compensate(layers)  # a round earlier: the residual exists (it is state, not encoding memory)
            feedback.settle(feedback.residual, INT8)
        tracemalloc.start()
        if codec.endswith("feedback"):
            sent = feedback.compensate(layers)
            archive = wire.prepare(sent, 1.0, compression="int8")
            feedback.settle(sent, INT8)
        else:
            archive = wire.prepare(layers, 1.0, compression=codec)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        del archive
        result[codec] = {"peak_extra_bytes": peak, "of_model": round(peak / model, 3)}
    return result


def loopback_rounds(layers: list[np.ndarray], rounds: int) -> dict:
    """A one-leaf round (upload, aggregate, download) on loopback, stored vs shuffle-zstd (both advertised)."""
    result = {}
    with local_server(1) as bench:
        branch_id = json.loads(bench.credentials[0].read_text())["branch_id"]
        bench.server.admin("PUT", f"/admin/v1/branches/{branch_id}/codecs", {"codecs": ["shuffle-zstd", "int8"]})
        with Client(str(bench.credentials[0]), host=bench.server.url, transport="websocket",
                    output_dir=bench.workdir / "out") as client:
            for codec in ("none", "shuffle-zstd", "int8"):
                if codec == "shuffle-zstd" and SHUFFLE_ZSTD is None:
                    continue
                times = []
                for _ in range(rounds):
                    started = time.perf_counter()
                    client.upload_arrays(1.0, layers, compression=codec if codec != "int8" else None)
                    client.download_aggregate(client.wait_for_aggregation(120))
                    times.append(time.perf_counter() - started)
                result[codec] = {"median_round_s": round(median(times), 4), "rounds": [round(t, 4) for t in times]}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--bytes-only", action="store_true", help="bytes per codec and delta only: no memory or rounds")
    parser.add_argument("--no-rounds", action="store_true", help="bytes and encoding memory: no loopback rounds")
    args = parser.parse_args()
    report: dict = {"load_before": load_average()}
    pairs = {"simulation_mlp": trained_mlp(), "resnet18_3_steps": resnet18_after_steps()}
    models = {name: layers for name, (_, layers) in pairs.items()}
    report["bytes"] = {name: codec_bytes(layers) for name, layers in models.items()}
    print(json.dumps(report["bytes"], indent=1), flush=True)
    report["delta"] = {name: delta_bytes(base, layers) for name, (base, layers) in pairs.items()}
    print(json.dumps(report["delta"], indent=1), flush=True)
    if args.bytes_only:
        report["load_after"] = load_average()
        print(save_report(report, args.out, prefix="codecs-delta-"))
        return
    report["encoding_memory"] = encoding_memory(models["resnet18_3_steps"], pairs["resnet18_3_steps"][0])
    print(json.dumps(report["encoding_memory"], indent=1), flush=True)
    if args.no_rounds:
        report["load_after"] = load_average()
        print(save_report(report, args.out, prefix="codecs-delta-"))
        return
    report["loopback_round_resnet18"] = loopback_rounds(models["resnet18_3_steps"], args.rounds)
    report["load_after"] = load_average()
    print(json.dumps(report["loopback_round_resnet18"], indent=1))
    print(save_report(report, args.out, prefix="codecs-"))


if __name__ == "__main__":
    main()
