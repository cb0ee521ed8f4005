"""Names bound to keys in deployment: the server admits a node to a secure round only under
a name whose registered key (its keys folder, as `fedtune keys` writes it) certified the
identity key the node presents and signs with."""

from __future__ import annotations

from flwr.app import Context, RecordDict

from fedtune.certs import make_client_key
from fedtune.secagg import identity
from fedtune.secagg.roster import certificate, node_identity, registered_check


def _node(tmp_path, private, node_id):
    ctx = Context(run_id=1, node_id=node_id, node_config={"identity-key": str(private)}, state=RecordDict(),
                  run_config={})
    key = node_identity(ctx, tmp_path / f"{node_id}.pem")
    public = identity.public_bytes(key)
    return key, public, certificate(ctx, public)


def test_a_node_naming_another_client_is_not_admitted(tmp_path):
    keys = tmp_path / "keys"
    private_a, _ = make_client_key(keys, "clinic-a")
    private_b, _ = make_client_key(keys, "clinic-b")
    check = registered_check(str(keys))
    a, pub_a, cert_a = _node(tmp_path, private_a, 11)
    assert check(11, "clinic-a", pub_a, cert_a) == ""
    assert "not certified by that client's registered key" in check(11, "clinic-b", pub_a, cert_a)
    assert "no registered key" in check(11, "clinic-z", pub_a, cert_a)
    assert "no registered key" in check(11, "../keys/clinic-a", pub_a, cert_a)
    b, pub_b, cert_b = _node(tmp_path, private_b, 12)
    assert "not certified" in check(12, "clinic-a", pub_b, cert_a)  # a's certificate on b's key: no
    assert "not certified" in check(12, "clinic-b", pub_a, cert_b)  # b vouching for a's key under b's name: no
    # and the identity key's signatures verify under that key only
    sig = identity.sign(a, identity.INPUT, b"d" * 32, 11, 1, b"")
    assert identity.verify(pub_a, sig, identity.INPUT, b"d" * 32, 11, 1, b"")
    assert not identity.verify(pub_b, sig, identity.INPUT, b"d" * 32, 11, 1, b"")


def test_a_node_keeps_one_identity_key_for_the_run_across_restarts(tmp_path):
    ctx = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    first, again = node_identity(ctx, tmp_path / "id.pem"), node_identity(ctx, tmp_path / "id.pem")
    assert identity.public_bytes(first) == identity.public_bytes(again)
    restarted = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})  # node state lost
    assert identity.public_bytes(node_identity(restarted, tmp_path / "id.pem")) == identity.public_bytes(first)
    assert (tmp_path / "id.pem").stat().st_mode & 0o077 == 0  # owner-only
    assert certificate(ctx, identity.public_bytes(first)) == b""  # simulation: nothing to certify with
    assert registered_check("") is None  # simulation: no keys folder
