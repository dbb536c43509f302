"""The OFFICIAL 2.7.1 client under run control (run with its own venv).

Protocol with the test, one line each way per step:
  -> "ready"; <- (run paused); -> {"status", "blocked"}
  <- (run stopped and started again); -> {"status", "run_number", "file_id"}
"""

import json
import sys
import time

import numpy as np
from branchkey.client import Client

credentials, host, workdir = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3]
client = Client(credentials, host=host, rbmq_host="127.0.0.1", ssl=False)


def wait_for(predicate):
    deadline = time.time() + 20
    while not predicate() and time.time() < deadline:
        time.sleep(0.05)


def say(payload):
    # the official client prints to stdout too: mark our lines
    print("@@", json.dumps(payload) if not isinstance(payload, str) else payload, flush=True)


path = client.save_weights(workdir + "/w", 5, [np.ones((2, 2), np.float32)])
say("ready")
sys.stdin.readline()
wait_for(lambda: client.run_status == "pause")
try:
    client.file_upload(path)
    blocked = False
except Exception as exc:  # the official client raises a bare Exception
    blocked = "run is blocked" in str(exc)
say({"status": client.run_status, "blocked": blocked})
sys.stdin.readline()
wait_for(lambda: client.run_status == "start" and client.run_number == 2)
say({"status": client.run_status, "run_number": client.run_number, "file_id": client.file_upload(path)})
client.close()
