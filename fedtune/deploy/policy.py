"""A data holder's privacy policy: the weakest guarantee its deployed client accepts.

Declared in client.toml's ``[policy]`` table, validated here, handed to the ClientApp as
node config, and checked by the client's own code against the run's public plan before
each round: a run asking for less (no DP, a larger δ, an untrusted accountant, no secure
aggregation or distributed DP when required, a weaker client-level ε) is refused, and the
refusal goes to the server's log, the client's ledger and ``fedtune audit``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from fedtune.errors import FedtuneError

ACCOUNTANTS = ("rdp", "prv")


@dataclass(frozen=True)
class Policy:
    dp: bool = True  # require DP-SGD on this client's records
    max_delta: float = 1e-5  # the largest δ accepted; the lifetime ε is stated at this δ
    accountants: list = field(default_factory=lambda: ["rdp"])  # accountants trusted for this client's ε
    secagg: bool = False  # require secure aggregation (the update leaves only masked)
    client_dp: bool = False  # require distributed DP: this client adds its share of client-level noise
    max_client_epsilon: float = 0.0  # under client_dp: the largest client-level ε (target and budget) accepted; 0 = any
    reveal_losses: bool = False  # under DP: send per-client losses (covered by no DP); the server cannot turn it on
    models: list = field(default_factory=list)  # base models a run may name besides the built-ins (names, folders)
    secagg_colluders: int = 0  # corrupted clients (besides the server) a secure round must tolerate; the run may raise it

    def check(self, where: str) -> Policy:
        """This policy, or FedtuneError naming ``where`` and the fix."""
        bad = [a for a in self.accountants if a not in ACCOUNTANTS] if isinstance(self.accountants, list) else [1]
        if not self.accountants or bad:
            raise FedtuneError(f"{where}: policy.accountants must list some of {', '.join(ACCOUNTANTS)} "
                               f"(got {self.accountants!r})")
        if not 0 < self.max_delta < 1:
            raise FedtuneError(f"{where}: policy.max_delta must be in (0, 1) (got {self.max_delta}); e.g. 1e-5")
        if self.client_dp and not self.secagg:
            raise FedtuneError(f"{where}: policy.client_dp = true needs policy.secagg = true (distributed DP noise is "
                               "added by the clients under secure aggregation)")
        if not (self.max_client_epsilon >= 0 and math.isfinite(self.max_client_epsilon)):
            raise FedtuneError(f"{where}: policy.max_client_epsilon must be a finite ε >= 0 (got {self.max_client_epsilon})")
        if not isinstance(self.models, list) or not all(isinstance(m, str) and m.strip() for m in self.models):
            raise FedtuneError(f"{where}: policy.models must be a list of model names or folders (got {self.models!r})")
        if not (isinstance(self.secagg_colluders, int) and self.secagg_colluders >= 0):
            raise FedtuneError(f"{where}: policy.secagg_colluders must be an integer >= 0 (got {self.secagg_colluders!r})")
        if self.secagg_colluders and not self.secagg:
            raise FedtuneError(f"{where}: policy.secagg_colluders applies under policy.secagg = true (else a run could "
                               "skip secure aggregation); set both or set secagg_colluders = 0")
        if self.max_client_epsilon > 0 and not self.client_dp:
            raise FedtuneError(f"{where}: policy.max_client_epsilon applies under policy.client_dp = true; set both or "
                               "set max_client_epsilon = 0")
        return self

    # ---- node config (the SuperNode hands it to every ClientApp process) --------------
    def to_node_config(self) -> dict[str, Any]:
        return {"policy-dp": self.dp, "policy-max-delta": self.max_delta,
                "policy-accountants": ",".join(self.accountants), "policy-secagg": self.secagg,
                "policy-client-dp": self.client_dp, "policy-max-client-epsilon": self.max_client_epsilon,
                "policy-reveal-losses": self.reveal_losses, "policy-models": "\n".join(self.models),
                "policy-secagg-colluders": self.secagg_colluders}

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> Policy:
        """The policy in ``node_config``; a key it lacks keeps the strict default."""
        d = cls()
        accountants = str(node_config.get("policy-accountants", ",".join(d.accountants)))
        return cls(bool(node_config.get("policy-dp", d.dp)), float(node_config.get("policy-max-delta", d.max_delta)),
                   [a for a in accountants.split(",") if a], bool(node_config.get("policy-secagg", d.secagg)),
                   bool(node_config.get("policy-client-dp", d.client_dp)),
                   float(node_config.get("policy-max-client-epsilon", d.max_client_epsilon)),
                   bool(node_config.get("policy-reveal-losses", d.reveal_losses)),
                   [m for m in str(node_config.get("policy-models", "")).split("\n") if m],
                   int(node_config.get("policy-secagg-colluders", d.secagg_colluders))).check("the node config")

    def model_violation(self, name: str) -> str:
        """'' if this client may load the base model ``name``, else why not: a run may name a
        built-in model or one the operator listed, never any other folder on this machine or
        a model from the Hub (it would load files the server chose)."""
        from fedtune.model import BUILTIN_MODELS  # lazy: fedtune.model imports torch; `client start` needs none

        if name in BUILTIN_MODELS or name in self.models:
            return ""
        return (f"the run's model.name {name!r} is not a built-in model ({', '.join(BUILTIN_MODELS)}) nor in this "
                "client's policy.models; add it there to accept it")

    # ---- the rule ---------------------------------------------------------------------
    def violation(self, cfg, secure: bool, records: int) -> str:
        """'' if a round of ``cfg`` (an update sent ``secure``-ly, ``records`` training
        records) meets this policy, else the reason for refusing it."""
        p, c = cfg.privacy, cfg.client_dp
        if self.dp and not p.dp:
            return "the run asks for privacy.dp = false, but this client's policy requires DP-SGD (policy.dp)"
        if p.dp and p.delta > self.max_delta:
            return f"the run's privacy.delta = {p.delta:g} is above this client's policy.max_delta = {self.max_delta:g}"
        if p.dp and records and p.delta * records >= 1:
            return (f"the run's privacy.delta = {p.delta:g} is not below 1/{records} (this client's records): "
                    "it would permit releasing a record outright")
        if p.dp and p.accountant not in self.accountants:
            return (f"the run's privacy.accountant = {p.accountant!r} is not one this client trusts "
                    f"(policy.accountants = {self.accountants})")
        if self.secagg and not secure:
            return "the server asks for an update outside secure aggregation, but this client's policy requires it (policy.secagg)"
        if self.client_dp and not c.enabled:
            return "the run has client_dp off, but this client's policy requires distributed DP (policy.client_dp)"
        asked = max(c.epsilon, cfg.client_budget)  # the noise is calibrated to the target, spent up to the budget
        if self.client_dp and self.max_client_epsilon > 0 and asked > self.max_client_epsilon:
            return (f"the run's client-level ε (client_dp.epsilon/budget = {asked:g}) is above this "
                    f"client's policy.max_client_epsilon = {self.max_client_epsilon:g}")
        return ""
