"""One leaf driven by the OFFICIAL branchkey client (run with the official client's venv).

Usage: python official_leaf.py SPEC.json   (writes SPEC["result"] as JSON)

Optional SPEC keys: "rbmq_port" (2.7.1: the broker's AMQP port, default 5672), "upload": false (only wait
for each round's aggregate, as a leaf restarted after its upload does), "ca": a CA bundle to verify an https
server with (the clients' `ssl` option; without it, plain http and ssl=False).

It does what a user of the official client does: read run details, save and upload weights,
wait for the aggregation id on the client's queue (2.7.1: AMQP; 3.0.1: WebSocket), download the
aggregate, send metrics. It loads the aggregate with numpy (allow_pickle=False) and writes the
arrays' values to the result so the test can compare them with its own weighted mean.
"""

import json
import sys
from importlib.metadata import version

import numpy as np

spec = json.load(open(sys.argv[1]))
credentials = json.load(open(spec["credentials"]))
major = int(version("branchkey").split(".")[0])

from branchkey.client import Client  # noqa: E402

if major >= 3:
    from branchkey import APIConfig, Credentials

    config = APIConfig(host=spec["host"], ssl=spec.get("ca", False))
    client = Client(Credentials.from_dict(credentials), api_config=config,
                    output_dir=spec["output_dir"])
else:
    # 2.7.1 derives the RabbitMQ host from `host` without removing the port: name it explicitly
    client = Client(credentials, host=spec["host"], rbmq_host="127.0.0.1", rbmq_port=spec.get("rbmq_port", 5672),
                    ssl=spec.get("ca", False))

result = {"version": version("branchkey"), "run_status": client.run_status, "run_number": client.run_number,
          "rounds": []}
try:
    for round_layers, weighting in zip(spec["rounds"], spec["weightings"]):
        file_id = None
        if spec.get("upload", True):  # False: only wait for the round's aggregate (the upload went in before)
            layers = [np.asarray(a, dtype=spec.get("dtype", "float32")) for a in round_layers]
            path = client.save_weights(spec["output_dir"] + "/upload", weighting, layers)
            file_id = client.file_upload(path)
        # client.queue, not get_latest_aggregation_id(): in 3.0.1 the consumer's blocking put on the
        # size-1 queue stalls from the second aggregate on unless the queue is read.
        aggregation_id = client.queue.get(timeout=spec["timeout"])
        if major >= 3:
            downloaded = client.file_download(aggregation_id)
        else:
            assert client.file_download(aggregation_id) is True
            downloaded = f"./aggregated_output/{aggregation_id}.npz"
        with np.load(downloaded, allow_pickle=False) as npz:
            keys = sorted(npz.files, key=lambda k: int(k.split("_")[1]))
            aggregate = [npz[k].tolist() for k in keys]
            dtypes = [str(npz[k].dtype) for k in keys]
        metrics_ok = client.send_performance_metrics(aggregation_id, json.dumps({"accuracy": 0.5}), "test")
        result["rounds"].append({"file_id": file_id, "aggregation_id": aggregation_id, "aggregate": aggregate,
                                 "dtypes": dtypes, "metrics_ok": metrics_ok, "keys": keys})
finally:
    client.close()
json.dump(result, open(spec["result"], "w"))
