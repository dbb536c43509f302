"""One leaf sending federated analytics with the OFFICIAL branchkey 3.x client (run in its own venv).

Usage: python official_analytics_leaf.py SPEC.json   (writes SPEC["result"] as JSON)

SPEC: "credentials", "host", "output_dir", "timeout", "result", and either "columns" (name -> raw values, sent
with save_analytics) or "fields" (name -> values, sent with save_fields). It does what a user of the official
client does: read the branch configuration, save and upload, wait for the aggregation id on the client's queue
(WebSocket), download the combined archive and read it with numpy (allow_pickle=False).
"""

import json
import math
import sys
from importlib.metadata import version

import numpy as np

spec = json.load(open(sys.argv[1]))
credentials = json.load(open(spec["credentials"]))

from branchkey import APIConfig, Credentials  # noqa: E402
from branchkey.client import Client  # noqa: E402

client = Client(Credentials.from_dict(credentials), api_config=APIConfig(host=spec["host"], ssl=False),
                output_dir=spec["output_dir"])


def plain(value):
    """An entry's values as JSON (NaN kept as the text 'nan')."""
    return [("nan" if isinstance(v, float) and math.isnan(v) else v) for v in value.reshape(-1).tolist()]


result = {"version": version("branchkey"), "config": client.get_branch_config()}
try:
    if "columns" in spec:
        path = client.save_analytics({k: np.asarray(v, dtype=float) for k, v in spec["columns"].items()},
                                     file_path=spec["output_dir"] + "/analytics")
    else:
        path = client.save_fields({k: np.asarray(v) for k, v in spec["fields"].items()},
                                  file_path=spec["output_dir"] + "/fields")
    result["file_id"] = client.file_upload(path)
    aggregation_id = client.queue.get(timeout=spec["timeout"])
    downloaded = client.file_download(aggregation_id)
    with np.load(downloaded, allow_pickle=False) as npz:
        result["entries"] = {k: {"dtype": str(npz[k].dtype), "values": plain(npz[k])} for k in npz.files}
    result["aggregation_id"] = aggregation_id
finally:
    client.close()
json.dump(result, open(spec["result"], "w"))
