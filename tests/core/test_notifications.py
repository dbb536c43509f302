"""Parsing notifications: both message types, and a clear error for anything else."""

import pytest

from branchkey_integrations.core.errors import ProtocolError
from branchkey_integrations.core.notifications import Backoff
from branchkey_integrations.core.protocol import aggregation_message, encode_message, parse_notification, run_status_message


def test_both_message_types_parse():
    agg = parse_notification(b'{"message_type": "aggregation_status", "body": {"aggregation_id": "a-1"}}')
    assert agg.aggregation_id == "a-1" and agg.run_status is None
    run = parse_notification('{"message_type": "run_status", "body": {"run_status": "pause"}}')
    assert run.run_status == "pause" and run.aggregation_id is None


@pytest.mark.parametrize("raw, message", [
    (b"\xff\xfe", "not JSON"), ("[]", "Expected"), ('{"message_type": "x", "body": {}}', "Unknown message_type"),
    ('{"message_type": "run_status", "body": {"run_status": "go"}}', "one of"),
    ('{"message_type": "aggregation_status", "body": {}}', "without an aggregation_id"),
])
def test_malformed_notifications_are_refused(raw, message):
    with pytest.raises(ProtocolError, match=message):
        parse_notification(raw)


def test_what_the_server_builds_the_client_parses():
    assert parse_notification(encode_message(aggregation_message("a-9"))).aggregation_id == "a-9"
    closing = parse_notification(encode_message(aggregation_message("a-9", run_number=2, round_index=0)))
    assert (closing.aggregation_id, closing.run_number, closing.round_index) == ("a-9", 2, 0)
    with pytest.raises(ProtocolError, match="round_index=-1"):
        parse_notification(encode_message(aggregation_message("a-9", run_number=2, round_index=-1)))
    assert parse_notification(encode_message(run_status_message("stop"))).run_status == "stop"
    with pytest.raises(ValueError, match="run_status"):
        run_status_message("halt")


def test_backoff_grows_exponentially_to_a_cap_and_resets():
    backoff = Backoff(initial=0.5, factor=2, maximum=3)
    assert [backoff.next() for _ in range(5)] == [0.5, 1, 2, 3, 3]
    backoff.reset()
    assert backoff.next() == 0.5
