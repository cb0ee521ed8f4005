"""Typed run configuration: defaults, loading (TOML file, Flower run config, overrides)
and validation, all in one place.

A config has sections (``[privacy]``, ``[train]``...). Flower's run config is flat, so the
same keys travel through Flower as ``"section.key"`` (see ``to_flat`` / ``from_flat``);
``pyproject.toml``'s ``[tool.flwr.app.config]`` holds these defaults so ``flwr run .``
works on its own.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

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
    dp_compute: float = 2.0  # DP with auto batch: example passes per round, as a multiple of local_epochs
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

CHOICES = {
    "model.device": None,  # validated separately (cuda:N)
    "model.precision": ("auto", "fp32", "bf16"),
    "data.partition": ("natural", "iid", "dirichlet"),
    "privacy.accountant": ("rdp", "prv"),
    "privacy.unit": ("record", "user"),
    "client_dp.accountant": ("rdp", "prv"),
    "federation.mode": ("federated", "centralized", "local"),
    "federation.aggregation": ("fedavg", "ffa", "fedsa"),
    "federation.server_optimizer": ("none", "avgm", "adam", "yogi"),
    "personalize.method": ("none", "finetune", "fedsa", "ditto"),
}


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


def to_nested(cfg: Config) -> dict[str, dict[str, Any]]:
    return {name: dataclasses.asdict(getattr(cfg, name)) for name in SECTIONS}


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


def _unknown_key(key: str) -> FedtuneError:
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
            raise _unknown_key(key)
        section, name = key.split(".", 1)
        values[section][name] = _coerce(key, value)
    cfg = Config(**{s: _SECTION_TYPES[s](**v) for s, v in values.items()})
    validate(cfg)
    return cfg


def flatten_toml(data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``{"privacy": {"epsilon": 3}}`` -> ``{"privacy.epsilon": 3}``, rejecting strays."""
    flat = {}
    for section, body in data.items():
        if section not in SECTIONS:
            close = difflib.get_close_matches(section, SECTIONS, n=1)
            hint = f"did you mean [{close[0]}]?" if close else f"sections are {', '.join(SECTIONS)}"
            raise FedtuneError(f"{where}: unknown section [{section}] ({hint})")
        if not isinstance(body, Mapping):
            raise FedtuneError(f"{where}: '{section}' must be a [section] table of keys")
        for key, value in body.items():
            flat[f"{section}.{key}"] = value
    return flat


def load(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Defaults, then the TOML file at ``path``, then ``overrides`` ({"section.key": v})."""
    flat = to_flat(Config())
    if path is not None:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise FedtuneError(f"config file {path} not found; pass a path such as simulations/default.toml") from None
        except tomllib.TOMLDecodeError as exc:
            raise FedtuneError(f"config file {path} is not valid TOML ({exc}); fix the syntax") from None
        for key, value in flatten_toml(data, str(path)).items():
            if key not in FIELD_TYPES:
                raise FedtuneError(f"{path}: {_unknown_key(key)}")
            flat[key] = value
    for key, value in (overrides or {}).items():
        if key not in FIELD_TYPES:
            raise _unknown_key(key)
        flat[key] = value
    return from_flat(flat)


def parse_assignment(text: str) -> tuple[str, Any]:
    """``"privacy.epsilon=3"`` -> ``("privacy.epsilon", 3)`` (value parsed as TOML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise FedtuneError(f"--set expects section.key=value (got {text!r})")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare word is taken as a string
    return key.strip(), value


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise FedtuneError(message)


def validate(cfg: Config) -> None:
    """Every rule about allowed values lives here. Raises FedtuneError on the first."""
    for key, choices in CHOICES.items():
        if choices is None:
            continue
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        _check(value in choices, f"config key {key} must be one of {', '.join(choices)} (got {value!r})")
    dev = cfg.model.device
    _check(
        dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit()),
        f"config key model.device must be auto, cpu, cuda or cuda:N (got {dev!r})",
    )
    _check(cfg.model.name.strip() != "", "config key model.name is empty; set a model such as smollm2-135m-instruct")
    _check(cfg.model.max_length >= 8, f"model.max_length must be at least 8 tokens (got {cfg.model.max_length})")
    _check(cfg.lora.r >= 1, f"lora.r must be a positive rank (got {cfg.lora.r})")
    _check(cfg.lora.alpha > 0, f"lora.alpha must be > 0 (got {cfg.lora.alpha})")
    _check(0 <= cfg.lora.dropout < 1, f"lora.dropout must be in [0, 1) (got {cfg.lora.dropout})")
    _check(bool(cfg.target_modules), "lora.target_modules is empty; name modules such as q_proj,v_proj")
    _check(cfg.data.source.strip() != "", "data.source is empty; use drugreview or a data file path")
    _check(0 < cfg.data.eval_fraction < 1, f"data.eval_fraction must be in (0, 1) (got {cfg.data.eval_fraction})")
    _check(cfg.data.dirichlet_alpha > 0, f"data.dirichlet_alpha must be > 0 (got {cfg.data.dirichlet_alpha})")
    _check(cfg.data.max_eval_examples >= 0, "data.max_eval_examples must be >= 0 (0 = all)")
    t = cfg.train
    _check(t.local_steps >= 0, f"train.local_steps must be >= 0 (got {t.local_steps})")
    _check(
        t.local_steps > 0 or (t.local_epochs > 0 and math.isfinite(t.local_epochs)),
        f"train.local_epochs must be > 0 when train.local_steps is 0 (got {t.local_epochs})",
    )
    _check(t.batch_size >= 0, f"train.batch_size must be >= 1, or 0 for the automatic choice (got {t.batch_size})")
    _check(t.physical_batch_size >= 0, "train.physical_batch_size must be >= 0 (0 = from train.memory_budget_mb)")
    _check(t.memory_budget_mb >= 0, f"train.memory_budget_mb must be >= 0 (got {t.memory_budget_mb}); 0 = the "
           "client's share of the machine")
    _check(t.learning_rate >= 0 and math.isfinite(t.learning_rate),
           f"train.learning_rate must be > 0, or 0 for the automatic choice (got {t.learning_rate})")
    _check(t.dp_compute > 0 and math.isfinite(t.dp_compute), f"train.dp_compute must be > 0 (got {t.dp_compute})")
    _check(t.weight_decay >= 0, f"train.weight_decay must be >= 0 (got {t.weight_decay})")
    _check(t.eval_batch_size >= 1, f"train.eval_batch_size must be >= 1 (got {t.eval_batch_size})")
    _check(t.threads >= 0, f"train.threads must be >= 0 (got {t.threads})")
    p = cfg.privacy
    if p.dp:
        _check(
            p.epsilon > 0 and math.isfinite(p.epsilon),
            f"privacy.epsilon must be a finite number > 0 (got {p.epsilon}); for no DP use --no-dp",
        )
        _check(
            0 < p.delta < 1,
            f"privacy.delta must be in (0, 1) (got {p.delta}); use less than 1/records, e.g. 1e-5",
        )
        _check(p.clip_norm > 0 and math.isfinite(p.clip_norm), f"privacy.clip_norm must be > 0 (got {p.clip_norm})")
        _check(p.budget >= 0 and math.isfinite(p.budget), f"privacy.budget must be >= 0 (got {p.budget}); 0 = privacy.epsilon")
        _check(p.noise_multiplier >= 0, f"privacy.noise_multiplier must be >= 0 (got {p.noise_multiplier}); 0 = calibrate")
    _check_user_unit(cfg)
    c = cfg.client_dp
    if c.enabled:
        _check(c.epsilon > 0 and math.isfinite(c.epsilon), f"client_dp.epsilon must be a finite number > 0 (got {c.epsilon})")
        _check(0 < c.delta < 1, f"client_dp.delta must be in (0, 1) (got {c.delta}); keep it below 1/clients")
        _check(c.clip_norm > 0 and math.isfinite(c.clip_norm), f"client_dp.clip_norm must be > 0 (got {c.clip_norm})")
        _check(0 < c.sample_rate <= 1, f"client_dp.sample_rate must be in (0, 1] (got {c.sample_rate})")
        _check(c.budget >= 0 and math.isfinite(c.budget), f"client_dp.budget must be >= 0 (got {c.budget}); 0 = client_dp.epsilon")
        _check(c.noise_multiplier >= 0, f"client_dp.noise_multiplier must be >= 0 (got {c.noise_multiplier}); 0 = calibrate")
        _check(c.min_clients == 0 or cfg.secagg.enabled, "client_dp.min_clients applies to distributed DP only; "
               "turn secagg on or set it to 0")
        _check(cfg.federation.mode == "federated",
               f"client-level DP needs federation.mode = federated (got {cfg.federation.mode}); turn client_dp off for baselines")
        _check(cfg.federation.clients_per_round == 0,
               "under client-level DP clients are sampled by client_dp.sample_rate (Poisson, which the accountant "
               "credits); set federation.clients_per_round = 0")
    g = cfg.secagg
    if g.enabled:
        _check(cfg.federation.mode == "federated",
               f"secure aggregation needs federation.mode = federated (got {cfg.federation.mode})")
        if cfg.client_dp.enabled:  # distributed DP: the clients add discrete Gaussian noise
            c = cfg.client_dp
            _check(c.sample_rate == 1, "distributed DP (client_dp with secagg) does not credit client sampling; set "
                   f"client_dp.sample_rate = 1 (got {c.sample_rate})")
            _check(c.accountant == "rdp", "distributed DP is accounted by a Rényi-DP bound; set client_dp.accountant "
                   f"= \"rdp\" (got {c.accountant!r})")
            _check(c.min_clients == 0 or 3 <= c.min_clients <= cfg.num_clients,
                   f"client_dp.min_clients must be 0 (all) or in 3..{cfg.num_clients} (got {c.min_clients})")
        _check(cfg.clients_per_round >= 3, f"secure aggregation needs at least 3 clients per round (got "
               f"{cfg.clients_per_round}): with 2, each could subtract its own update from the sum")
        _check(8 <= g.bits <= 32, f"secagg.bits must be in 8..32 (got {g.bits})")
        _check(g.clip > 0 and math.isfinite(g.clip), f"secagg.clip must be > 0 (got {g.clip})")
        _check(g.max_weight >= 1 and math.isfinite(g.max_weight), f"secagg.max_weight must be >= 1 (got {g.max_weight})")
        _check(g.degree >= 2 and g.degree % 2 == 0, f"secagg.degree must be even and >= 2 (got {g.degree}): each "
               "client gets degree/2 neighbours on either side of a ring")
        _check(g.threshold >= 0, f"secagg.threshold must be >= 0 (got {g.threshold}); 0 = a majority of the neighbours")
        _check(2 <= g.min_inputs <= cfg.clients_per_round, f"secagg.min_inputs must be in 2..{cfg.clients_per_round} "
               f"(the clients per round; got {g.min_inputs}): a sum of one input is that input")
    a = cfg.audit
    _check(a.canaries >= 0 and a.secrets >= 0, "audit.canaries and audit.secrets must be >= 0")
    _check(a.canaries == 0 or a.canaries >= 10, f"audit.canaries must be 0 or at least 10 (got {a.canaries})")
    _check(a.canary_words >= 2, f"audit.canary_words must be >= 2 (got {a.canary_words})")
    _check(1 <= a.secret_digits <= 6, f"audit.secret_digits must be in 1..6 (got {a.secret_digits})")
    _check(a.secret_repeats >= 1, f"audit.secret_repeats must be >= 1 (got {a.secret_repeats})")
    _check(a.canary_records == 1 or (a.canary_records > 1 and cfg.privacy.unit == "user"),
           f"audit.canary_records = {a.canary_records} plants canary people with several records, which only "
           "privacy.unit = \"user\" protects as one; set it to 1 or use the user unit")
    f = cfg.federation
    _check(f.clients >= 1, f"federation.clients must be >= 1 (got {f.clients})")
    _check(f.rounds >= 1, f"federation.rounds must be >= 1 (got {f.rounds})")
    _check(f.clients_per_round >= 0, "federation.clients_per_round must be >= 0 (0 = all)")
    _check(0 <= f.min_clients <= cfg.num_clients, f"federation.min_clients must be in 0..{cfg.num_clients} (got "
           f"{f.min_clients}); 0 = every client selected for the round")
    _check(f.round_timeout > 0, "federation.round_timeout must be > 0 seconds")
    _check(f.server_lr >= 0 and math.isfinite(f.server_lr), f"federation.server_lr must be >= 0 (got {f.server_lr}); 0 = default")
    _check(0 <= f.server_momentum < 1, f"federation.server_momentum must be in [0, 1) (got {f.server_momentum})")
    _check(0 <= f.server_beta2 < 1, f"federation.server_beta2 must be in [0, 1) (got {f.server_beta2})")
    _check(f.server_tau > 0, f"federation.server_tau must be > 0 (got {f.server_tau})")
    _check(f.server_optimizer == "none" or f.mode != "local",
           f"federation.server_optimizer={f.server_optimizer} needs an aggregate, which local mode never makes; "
           "set it to none or federation.mode = federated")
    _check_aggregation(cfg)
    _check_personalize(cfg)
    s = cfg.simulation
    _check(s.client_cpus >= 1, f"simulation.client_cpus must be a whole number >= 1 (got {s.client_cpus})")
    _check(s.client_gpus == -1 or 0 <= s.client_gpus <= 1, "simulation.client_gpus must be -1 (auto) or in [0, 1]")
    _check(s.total_cpus >= 0, "simulation.total_cpus must be >= 0 (0 = all cores)")


def _check_aggregation(cfg: Config) -> None:
    """The method table in fedtune/aggregation.py (and the README) decides what combines."""
    from fedtune.aggregation import METHODS

    name = cfg.federation.aggregation
    method = METHODS[name]
    _check(not cfg.secagg.enabled or method.secagg, f"federation.aggregation={name} is not a linear sum of what "
           "clients send, so secure aggregation cannot compute it; use fedavg, ffa or fedsa, or turn secagg off")
    _check(not cfg.client_dp.enabled or method.client_dp, f"federation.aggregation={name} does not work with "
           "client-level DP; use fedavg, ffa or fedsa, or turn client_dp off")


def _check_user_unit(cfg: Config) -> None:
    p = cfg.privacy
    _check(p.records_per_user >= 1, f"privacy.records_per_user must be >= 1 (got {p.records_per_user}): the records "
           "of a sampled person that one step uses")
    if p.unit == "user":
        _check(cfg.data.user_field.strip() != "", "privacy.unit = \"user\" needs data.user_field, the column that "
               "names the person behind each record (e.g. patient_id)")
        _check(cfg.federation.mode != "centralized", "privacy.unit = \"user\" is per client; centralized mode pools "
               "clients whose people could not be told apart; use federation.mode = federated or local")


def _check_personalize(cfg: Config) -> None:
    p = cfg.personalize
    if p.method == "none":
        return
    _check(cfg.federation.mode == "federated", f"personalize.method={p.method} starts from the global adapter of a "
           f"federated run (federation.mode = {cfg.federation.mode}); set personalize.method = none")
    _check(p.method != "fedsa" or cfg.federation.aggregation == "fedsa", "personalize.method=fedsa keeps the client's "
           "own lora_B, which only federation.aggregation=fedsa trains; set both to fedsa or pick finetune or ditto")
    _check(p.steps >= 1, f"personalize.steps must be >= 1 (got {p.steps})")
    _check(p.lr > 0 and math.isfinite(p.lr), f"personalize.lr must be > 0 (got {p.lr})")
    _check(p.ditto_lambda >= 0 and math.isfinite(p.ditto_lambda), f"personalize.ditto_lambda must be >= 0 (got {p.ditto_lambda})")
    _check(not p.dp or cfg.privacy.dp, "personalize.dp = true spends the run's DP-SGD budget, but privacy.dp is false; "
           "set personalize.dp = false (the personalized model is then never released)")


def dump_toml(cfg: Config) -> str:
    """The config as a sectioned TOML document (the run folder's config.toml)."""
    lines = []
    for section, values in to_nested(cfg).items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
