"""The checks a client makes on a secure round: its own config and policy decide, the server
only asks. Called by secure aggregation's client stages (fedtune.secagg.flower)."""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context, Message

from fedtune import release
from fedtune.client.setup import ClientSetup, config_from_context, own_config
from fedtune.deploy.node import from_node_config as deployed_node
from fedtune.errors import FedtuneError
from fedtune.privacy.distributed import plan_for
from fedtune.runfolder import client_dir, release_path, run_dir_for
from fedtune.secagg.flower import ENCODING, Encoding

_DDG: dict[tuple, object] = {}


def client_name(context: Context) -> str:
    """This client's name, without importing torch (secure aggregation is federated: fedtune.data.client_name)."""
    node = deployed_node(context.node_config)
    return node.name if node is not None else f"client-{int(context.node_config.get('partition-id', 0))}"


def own_run_dir(context: Context) -> Path:
    """This client's run folder, without loading the model (secure aggregation's key stages)."""
    node = deployed_node(context.node_config)
    return node.run_dir(own_config(context)) if node is not None else run_dir_for(
        config_from_context(context), context.run_id)


def identity_file(context: Context) -> Path:
    """Where this client keeps its secure-aggregation identity key for the run (fedtune.secagg.roster)."""
    return client_dir(own_run_dir(context), client_name(context)) / "secagg-identity.pem"


def bind(context: Context, server_round: int, input_set: bytes) -> None:
    """The input set this client signs for its release of the round, recorded first (fedtune.release)."""
    release.bind(release_path(own_run_dir(context), client_name(context)), server_round, input_set.hex())


def min_inputs(context: Context) -> int:
    """This client's floor on real inputs per secure sum: client.toml's in deployment (the
    server cannot lower it); the run config's in simulation, which trusts its own setup."""
    node = deployed_node(context.node_config)
    return node.min_inputs if node is not None else config_from_context(context).secagg.min_inputs


def colluders(context: Context) -> int:
    """The corrupted clients this client's secure rounds must tolerate: the run config's, raised
    to client.toml's policy.secagg_colluders in deployment (the server cannot lower it)."""
    node = deployed_node(context.node_config)
    own = config_from_context(context).secagg.colluders
    return max(own, node.policy.secagg_colluders) if node is not None else own


def check_encoding(context: Context, encoding) -> None:
    """Distributed DP: this client adds the noise its own config calls for; a server asking
    for other parameters (less noise, another clip) gets a refusal.

    Checked at advertise without the model: the plan is derived for the dimension the server
    names, and collect refuses (before training or spending) an adapter of another size."""
    node = deployed_node(context.node_config)
    cfg = own_config(context)
    who = node.name if node is not None else f"partition {context.node_config.get('partition-id', 0)}"
    reason = node.policy.violation(cfg, True, 0) if node is not None else ""
    if reason:  # refused at the first message of a secure round, before any key is made
        raise FedtuneError(f"{who} refused the round: policy: {reason}")
    if not cfg.client_dp.enabled:
        return
    if encoding.ddg is None:
        raise FedtuneError(f"{who}: the server asks for secure aggregation without distributed-DP noise, but this "
                           "client's config has client_dp on; refusing to send an un-noised update")
    key = (cfg.client_dp, cfg.secagg, cfg.federation, encoding.ddg.dim)
    if key not in _DDG:
        if len(_DDG) >= 8:  # a long-lived worker serves run after run: keep a few plans, not all
            _DDG.clear()
        _DDG[key] = plan_for(cfg, encoding.ddg.dim)
    mine = _DDG[key].to_dict()
    asked = encoding.ddg.to_dict()
    diff = [f"{k}={asked[k]!r} (mine {mine[k]!r})" for k in mine if asked[k] != mine[k]]
    if diff:
        raise FedtuneError(f"{who}: the server's distributed-DP parameters differ from this client's config: "
                           f"{', '.join(diff)}; refusing the round")


def check_ddg_dim(msg: Message, context: Context, s: ClientSetup) -> None:
    """Collect under distributed DP: the dimension checked at advertise must be the adapter's
    (the global adapter sent is checked against the model before training)."""
    if not s.cfg.client_dp.enabled:
        return
    ddg = Encoding.from_json(context.state.config_records[ENCODING]["json"]).ddg  # KeyError: no advertise
    size = sum(int(a.numpy().size) for a in msg.content["arrays"].values())
    if ddg is None or ddg.dim != size:
        raise FedtuneError(f"{s.name}: the server's distributed-DP plan is for {ddg.dim if ddg else 0} values but the "
                           f"adapter it sent has {size}; refusing the round")
