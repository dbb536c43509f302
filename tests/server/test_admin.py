"""Admin API: removing a tree's broker state (``DELETE /admin/v1/trees/{tree_id}/broker``)."""

from __future__ import annotations

from urllib.parse import quote

import pytest
import requests

from ..conftest import AMQP_URL, MANAGEMENT_URL


def _management(method: str, resource: str) -> requests.Response:
    return requests.request(method, f"{MANAGEMENT_URL}/api/{resource}", auth=("guest", "guest"), timeout=10)


def test_without_a_broker_removal_is_a_no_op_and_unknown_trees_are_404(live) -> None:
    branch, _ = live.make_branch(2)
    done = live.admin("DELETE", f"/admin/v1/trees/{branch['tree_id']}/broker", expect=200)
    assert done == {"tree_id": branch["tree_id"], "amqp": False, "leaves": 0}
    missing = live.admin("DELETE", "/admin/v1/trees/no-such-tree/broker", expect=404)
    assert "no-such-tree" in missing["error"]
    anonymous = requests.delete(f"{live.url}/admin/v1/trees/{branch['tree_id']}/broker", timeout=10)
    assert anonymous.status_code == 401
    assert live.admin("GET", f"/admin/v1/branches/{branch['id']}", expect=200)["id"] == branch["id"]  # the tree stays


@pytest.mark.amqp
def test_removal_deletes_the_trees_vhost_and_its_leaf_users(start_server, rabbitmq) -> None:
    live = start_server(amqp_url=AMQP_URL, amqp_management_url=MANAGEMENT_URL)
    branch, leaves = live.make_branch(2)
    vhost, users = f"vhosts/{quote(branch['tree_id'], safe='')}", [f"users/{quote(leaf['id'], safe='')}" for leaf in leaves]
    try:
        assert _management("GET", vhost).status_code == 200
        assert all(_management("GET", user).status_code == 200 for user in users)
        done = live.admin("DELETE", f"/admin/v1/trees/{branch['tree_id']}/broker", expect=200)
        assert done == {"tree_id": branch["tree_id"], "amqp": True, "leaves": 2}
        assert _management("GET", vhost).status_code == 404
        assert [_management("GET", user).status_code for user in users] == [404, 404]
        live.admin("DELETE", f"/admin/v1/trees/{branch['tree_id']}/broker", expect=200)  # a repeat is fine
    finally:
        for resource in (vhost, *users):
            _management("DELETE", resource)
