"""The typed run configuration: one frozen dataclass per section (``[privacy]``,
``[train]``...), the ``Config`` that holds them, and its flat keys (``"section.key"``,
Flower's run-config shape: ``to_flat``; ``from_flat`` coerces and validates). Adding a
key: a field here with its default and a comment, its rule in validate.py (per section), its default in
simulations/default.toml and pyproject.toml's ``[tool.flwr.app.config]``.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from fedtune.config.validate import validate
from fedtune.errors import FedtuneError


@dataclass(frozen=True)
class RunSection:
    name: str = "drugreview-dp"  # run folder name (a timestamp is appended)
    output: str = "runs"  # parent folder of run folders
    dir: str = ""  # exact run folder; set by `fedtune simulate`
    seed: int = 0  # data split, LoRA init, client sampling (never DP noise)


@dataclass(frozen=True)
class ModelSection:
    name: str = "smollm2-135m-instruct"  # built-in name, local folder or HF model id
    cache_dir: str = ""  # default: $FEDTUNE_CACHE or ~/.cache/fedtune
    max_length: int = 128  # tokens per example (longer ones are truncated)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto | fp32 | bf16 (autocast; LoRA math stays fp32)


@dataclass(frozen=True)
class LoraSection:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str = "q_proj,v_proj"  # comma-separated module names


@dataclass(frozen=True)
class DataSection:
    source: str = "drugreview"  # built-in name or a .jsonl/.json/.csv/.parquet file
    partition: str = "natural"  # natural (by a field) | iid | dirichlet
    partition_by: str = "condition"  # field for natural and dirichlet partitions
    dirichlet_alpha: float = 0.5
    text_field: str = "text"  # used when present ...
    prompt_field: str = "prompt"  # ... otherwise prompt + completion (loss on completion)
    completion_field: str = "completion"
    eval_fraction: float = 0.2  # held out on every client, never trained on
    max_eval_examples: int = 0  # cap per client for evaluation speed; 0 = all
    user_field: str = ""  # column naming the person behind each record (privacy.unit = "user")


@dataclass(frozen=True)
class TrainSection:
    local_epochs: float = 0.5  # passes over the client's data per round
    local_steps: int = 0  # > 0 overrides local_epochs
    batch_size: int = 0  # expected batch size (Poisson sampling under DP); 0 = auto: 16, under DP fedtune.privacy.defaults
    physical_batch_size: int = 0  # examples per forward/backward pass; 0 = as many as memory_budget_mb holds
    memory_budget_mb: int = 0  # a client's training memory; 0 = its share of the machine (fedtune.memory)
    learning_rate: float = 0.0  # 0 = auto: 0.005, under DP fedtune.privacy.defaults
    dp_compute: float = 1.5  # DP with auto batch: example passes per round, as a multiple of local_epochs
    weight_decay: float = 0.0
    eval_batch_size: int = 16
    threads: int = 0  # torch threads per client; 0 = its CPU share (simulation) or all cores


@dataclass(frozen=True)
class PrivacySection:
    dp: bool = True  # DP-SGD on every client; false = plain training (baseline)
    epsilon: float = 8.0  # target ε for the whole run; noise is calibrated to it
    delta: float = 1e-5
    clip_norm: float = 1.0  # per-example gradient clipping bound C
    accountant: str = "rdp"  # rdp | prv
    budget: float = 0.0  # ε a client will spend at most; 0 = epsilon
    noise_multiplier: float = 0.0  # > 0: use this σ instead of calibrating
    seed: int = -1  # tests only: seeds DP noise and sampling (recorded); -1 = OS entropy
    reveal_losses: bool = True  # under DP: send per-client losses (covered by no DP; audited); a deployed
    # client ignores this and follows its operator's policy.reveal_losses (default false)
    unit: str = "record"  # record | user (every record with the same data.user_field at a client)
    records_per_user: int = 4  # user unit: records of a sampled user in one step, at most


@dataclass(frozen=True)
class ClientDPSection:
    """Client-level DP (DP-FedAvg): protects everything one client holds."""

    enabled: bool = False
    epsilon: float = 8.0  # target ε over all rounds; the server's noise is calibrated to it
    delta: float = 1e-3  # keep below 1 / number of clients
    clip_norm: float = 1.0  # each client's whole update is clipped to this L2 norm
    sample_rate: float = 1.0  # each client joins a round with this probability (Poisson)
    accountant: str = "rdp"  # rdp | prv
    budget: float = 0.0  # ε the server will spend at most; 0 = epsilon
    noise_multiplier: float = 0.0  # > 0: use this σ instead of calibrating
    min_clients: int = 0  # with secagg: fewest clients whose noise a round's sum needs; 0 = all clients


@dataclass(frozen=True)
class SecAggSection:
    """Secure aggregation (SecAgg+): the server learns only the sum of the updates."""

    enabled: bool = False
    bits: int = 24  # fixed-point precision per value
    clip: float = 0.25  # each update value is clipped to [-clip, clip] before encoding
    max_weight: float = 1000.0  # public bound on one client's examples (its weight)
    degree: int = 8  # neighbours per client (the full graph when there are fewer clients)
    threshold: int = 0  # shares needed to rebuild a secret; 0 = a majority of the neighbours
    min_inputs: int = 3  # fewest real inputs (not refusals, not dropouts) in a released sum
    colluders: int = 0  # corrupted clients (besides the server) tolerated: raises t and the quorum (robustness cost)


@dataclass(frozen=True)
class AuditSection:
    """Planted records for the empirical audit (`fedtune audit --empirical`)."""

    canaries: int = 0  # random records, each in training with probability 1/2 (one-run audit)
    canary_words: int = 12  # random words per canary
    secrets: int = 0  # Secret-Sharer secrets ("The access code of <name> is <digits>.")
    secret_digits: int = 4  # digits per secret: 10^digits candidates
    secret_repeats: int = 4  # copies of each secret in its client's training data
    canary_records: int = 1  # records per canary, all one person's (> 1 needs privacy.unit = "user")


@dataclass(frozen=True)
class FederationSection:
    mode: str = "federated"  # federated | centralized | local
    clients: int = 4
    rounds: int = 2
    clients_per_round: int = 0  # 0 = all clients every round
    min_clients: int = 0  # fewest clients that must train in a round, else the run fails; 0 = all selected
    round_timeout: float = 3600.0  # seconds to wait for replies
    stage_timeout: float = 60.0  # seconds to wait in a SecAgg+ key stage (all but collect: no training)
    aggregation: str = "fedavg"  # fedavg (A, B averaged apart) | ffa (A frozen, B sent) | fedsa (A sent, B local)
    server_optimizer: str = "none"  # none | avgm | adam | yogi, applied to the averaged update
    server_lr: float = 0.0  # 0 = Flower's default for the optimizer (avgm 1.0, adam 0.1, yogi 0.01)
    server_momentum: float = 0.9  # avgm's momentum; adam's and yogi's beta1
    server_beta2: float = 0.99  # adam and yogi
    server_tau: float = 1e-3  # adam and yogi: adaptivity (added to sqrt(v))


@dataclass(frozen=True)
class PersonalizeSection:
    """After the last round, each client adapts the global adapter to its own data."""

    method: str = "none"  # none | finetune | fedsa (keep the local B) | ditto (prox toward the global)
    steps: int = 20  # local optimizer steps (finetune, ditto; also the local-only comparison model)
    lr: float = 5e-3
    dp: bool = True  # DP-SGD charged to the client's ledger; false = a model that is never released
    ditto_lambda: float = 0.1  # ditto: weight of lambda/2 * ||w - w_global||^2


@dataclass(frozen=True)
class SimulationSection:
    client_cpus: int = 1  # CPU cores per simulated client, at least (idle cores are shared out)
    client_gpus: float = -1.0  # GPU share per client; -1 = auto (share all GPUs)
    total_cpus: int = 0  # cores for the simulation; 0 = all


@dataclass(frozen=True)
class Config:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    client_dp: ClientDPSection = field(default_factory=ClientDPSection)
    secagg: SecAggSection = field(default_factory=SecAggSection)
    federation: FederationSection = field(default_factory=FederationSection)
    simulation: SimulationSection = field(default_factory=SimulationSection)
    audit: AuditSection = field(default_factory=AuditSection)
    personalize: PersonalizeSection = field(default_factory=PersonalizeSection)

    # ---- derived values -------------------------------------------------------
    @property
    def budget(self) -> float:
        """The ε a client may spend: privacy.budget, or the target ε."""
        return self.privacy.budget or self.privacy.epsilon

    @property
    def client_budget(self) -> float:
        """The client-level ε the server may spend: client_dp.budget, or its target ε."""
        return self.client_dp.budget or self.client_dp.epsilon

    @property
    def num_clients(self) -> int:
        """Simulated clients: one in centralized mode."""
        return 1 if self.federation.mode == "centralized" else self.federation.clients

    @property
    def clients_per_round(self) -> int:
        k = self.federation.clients_per_round
        return self.num_clients if k <= 0 else min(k, self.num_clients)

    @property
    def target_modules(self) -> list[str]:
        return [m.strip() for m in self.lora.target_modules.split(",") if m.strip()]

    def replace(self, **sections: Mapping[str, Any]) -> Config:
        """Copy with some keys changed: ``cfg.replace(privacy={"epsilon": 3})``."""
        flat = to_flat(self)
        for section, values in sections.items():
            for key, value in values.items():
                flat[f"{section}.{key}"] = value
        return from_flat(flat)


SECTIONS = {f.name: f.type for f in fields(Config)}
_SECTION_TYPES = {f.name: f.default_factory for f in fields(Config)}  # type: ignore[misc]


def _field_types() -> dict[str, type]:
    out = {}
    for sec_name, factory in _SECTION_TYPES.items():
        for f in fields(factory()):
            out[f"{sec_name}.{f.name}"] = type(getattr(factory(), f.name))
    return out


FIELD_TYPES = _field_types()


def to_flat(cfg: Config) -> dict[str, Any]:
    """``{"section.key": value}`` for every key (Flower's run-config shape)."""
    out = {}
    for sec_name in SECTIONS:
        section = getattr(cfg, sec_name)
        for f in fields(section):
            out[f"{sec_name}.{f.name}"] = getattr(section, f.name)
    return out


def _coerce(key: str, value: Any) -> Any:
    want = FIELD_TYPES[key]
    if want is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise FedtuneError(f"config key {key} must be true or false (got {value!r})")
    if want is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise FedtuneError(f"config key {key} must be a whole number (got {value!r})")
    if want is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and value.lower() in ("inf", "infinity"):
            return math.inf
        raise FedtuneError(f"config key {key} must be a number (got {value!r})")
    if want is str:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return ",".join(value)  # e.g. target_modules = ["q_proj", "v_proj"]
        if isinstance(value, str):
            return value
        raise FedtuneError(f"config key {key} must be a string (got {value!r})")
    raise AssertionError(f"unhandled type for {key}")


def unknown_key(key: str) -> FedtuneError:
    close = difflib.get_close_matches(key, FIELD_TYPES, n=1)
    hint = f"did you mean '{close[0]}'?" if close else "see simulations/default.toml for all keys"
    return FedtuneError(f"unknown config key '{key}' ({hint})")


def from_flat(flat: Mapping[str, Any], *, ignore_unknown: bool = False) -> Config:
    """Build and validate a Config from ``{"section.key": value}``."""
    values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for key, value in flat.items():
        if key not in FIELD_TYPES:
            if ignore_unknown:
                continue
            raise unknown_key(key)
        section, name = key.split(".", 1)
        values[section][name] = _coerce(key, value)
    cfg = Config(**{s: _SECTION_TYPES[s](**v) for s, v in values.items()})
    validate(cfg)
    return cfg
