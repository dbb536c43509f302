"""One leaf of the OFFICIAL ``branchkey`` 2.7.1 client, one whole round per line read on stdin.

Run by ``benchmarks/whole_round.py`` with the Python of the official client's own virtual
environment (it imports nothing of this project). Usage: ``python official_round.py SPEC_JSON``;
SPEC holds ``credentials`` (a file), ``host``, ``shapes`` (the model's layer shapes) and ``workdir``.
For every line ``round`` it does what a user of the official client does, timed from the first step
to the last: ``save_weights``, ``file_upload``, the aggregation id from ``client.queue`` (AMQP),
``file_download``, and ``np.load`` of every layer; it prints ``{"seconds": ..., "aggregation_id": ...}``.
"""

import json
import os
import sys
import time

import numpy as np
from branchkey.client import Client

spec = json.loads(sys.argv[1])
os.chdir(spec["workdir"])  # file_download writes ./aggregated_output/<id>.npz
rng = np.random.default_rng(0)
layers = [rng.standard_normal(tuple(shape), dtype=np.float32) * np.float32(0.02) for shape in spec["shapes"]]
client = Client(json.load(open(spec["credentials"])), host=spec["host"], rbmq_host="127.0.0.1", ssl=False)
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    if line.strip() != "round":
        break
    start = time.perf_counter()
    path = client.save_weights(os.path.join(spec["workdir"], "upload"), 10, layers)
    client.file_upload(path)
    aggregation_id = client.queue.get(timeout=600)
    assert client.file_download(aggregation_id) is True
    with np.load(f"./aggregated_output/{aggregation_id}.npz", allow_pickle=False) as npz:
        loaded = [npz[key] for key in npz.files]
    seconds = time.perf_counter() - start
    assert len(loaded) == len(layers)
    os.unlink(f"./aggregated_output/{aggregation_id}.npz")
    print(json.dumps({"seconds": seconds, "aggregation_id": aggregation_id}), flush=True)
