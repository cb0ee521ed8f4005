"""Names bound to keys in deployment: the server admits a node to a secure round only under
a name whose registered key (its keys folder, as `fedtune keys` writes it) the node holds,
and signs with; a deployed client signs with its own authentication key."""

from __future__ import annotations

from flwr.app import Context, RecordDict

from fedtune.certs import make_client_key
from fedtune.secagg import identity
from fedtune.secagg.roster import node_identity, registered_check


def test_a_node_naming_another_client_is_not_admitted(tmp_path):
    keys = tmp_path / "keys"
    private_a, _ = make_client_key(keys, "clinic-a")
    private_b, _ = make_client_key(keys, "clinic-b")
    check = registered_check(str(keys))
    a = node_identity(Context(run_id=1, node_id=11, node_config={"identity-key": str(private_a)}, state=RecordDict(),
                              run_config={}))
    assert check(11, "clinic-a", identity.public_bytes(a)) == ""
    assert "does not hold that client's registered key" in check(11, "clinic-b", identity.public_bytes(a))
    assert "no registered key" in check(11, "clinic-z", identity.public_bytes(a))
    assert "no registered key" in check(11, "../keys/clinic-a", identity.public_bytes(a))
    # and its signatures verify under the registered key only
    sig = identity.sign(a, identity.INPUT, b"d" * 32, 11, 1)
    assert identity.verify(identity.public_bytes(a), sig, identity.INPUT, b"d" * 32, 11, 1)
    b = node_identity(Context(run_id=1, node_id=12, node_config={"identity-key": str(private_b)}, state=RecordDict(),
                              run_config={}))
    assert not identity.verify(identity.public_bytes(b), sig, identity.INPUT, b"d" * 32, 11, 1)


def test_a_simulated_node_keeps_one_identity_key_for_the_run():
    ctx = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    first, again = node_identity(ctx), node_identity(ctx)
    assert identity.public_bytes(first) == identity.public_bytes(again)
    assert registered_check("") is None  # simulation: no keys folder
