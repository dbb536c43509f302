"""Parsing notifications: both message types, and a clear error for anything else; a transport's reconnects:
its connect listeners, and an outage said once."""

import pytest

from branchkey_integrations.core.errors import NotificationError, ProtocolError
from branchkey_integrations.core.notifications import Backoff, NotificationTransport
from branchkey_integrations.core.protocol import aggregation_message, encode_message, parse_notification, run_status_message

from ..conftest import wait_until


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



class ScriptedTransport(NotificationTransport):
    """Follows a script, one step per connection attempt (fault injection): ``"drop"`` opens the channel and
    loses it, ``"fail"`` never opens it, ``"stay"`` opens it until closed."""

    name = "scripted"

    def __init__(self, *steps: str) -> None:
        super().__init__(Backoff(0.01, 1.0, 0.01))
        self.steps = list(steps)

    def _consume(self) -> None:
        step = self.steps.pop(0)
        if step != "fail":
            self._set_connected()
        if step != "stay":
            raise NotificationError("connection reset" if step == "drop" else "connection refused")
        self._closing.wait()

    def _interrupt(self) -> None:
        pass


def test_each_reconnect_calls_the_connect_listeners_and_an_outage_is_warned_about_once(caplog):
    transport, opened = ScriptedTransport("drop", "fail", "fail", "stay"), []
    transport.add_connect_listener(lambda: opened.append(transport.connected.is_set()))
    with caplog.at_level("INFO", logger="branchkey_integrations"):
        transport.start(lambda notification: None)
        wait_until(lambda: len(opened) == 2, 10, "the first connection and the reconnection")
        transport.close()
    assert opened == [True, True] and transport.reconnects == 3
    levels = [(r.levelname, r.getMessage().split(": ")[1].split(";")[0]) for r in caplog.records
              if "reconnecting in" in r.getMessage()]
    assert levels == [("WARNING", "connection reset"), ("INFO", "connection refused"), ("INFO", "connection refused")]
    assert "connected again after 3 failed attempt(s)" in caplog.text
