"""Every rule about allowed values, one function per section. ``validate`` raises
FedtuneError (one line naming the key and the fix) on the first broken rule.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from fedtune.aggregation import METHODS
from fedtune.errors import FedtuneError

if TYPE_CHECKING:
    from fedtune.config.schema import Config

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


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise FedtuneError(message)


def validate(cfg: Config) -> None:
    """Every rule about allowed values lives here. Raises FedtuneError on the first."""
    for check in (_choices, _model, _lora, _data, _train, _privacy, _check_user_unit, _client_dp, _secagg, _audit,
                  _federation, _check_aggregation, _check_personalize, _simulation):
        check(cfg)


def _choices(cfg: Config) -> None:
    for key, choices in CHOICES.items():
        if choices is None:
            continue
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        _check(value in choices, f"config key {key} must be one of {', '.join(choices)} (got {value!r})")


def _model(cfg: Config) -> None:
    dev = cfg.model.device
    _check(
        dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit()),
        f"config key model.device must be auto, cpu, cuda or cuda:N (got {dev!r})",
    )
    _check(cfg.model.name.strip() != "", "config key model.name is empty; set a model such as smollm2-135m-instruct")
    _check(cfg.model.max_length >= 8, f"model.max_length must be at least 8 tokens (got {cfg.model.max_length})")


def _lora(cfg: Config) -> None:
    _check(cfg.lora.r >= 1, f"lora.r must be a positive rank (got {cfg.lora.r})")
    _check(cfg.lora.alpha > 0, f"lora.alpha must be > 0 (got {cfg.lora.alpha})")
    _check(0 <= cfg.lora.dropout < 1, f"lora.dropout must be in [0, 1) (got {cfg.lora.dropout})")
    _check(bool(cfg.target_modules), "lora.target_modules is empty; name modules such as q_proj,v_proj")


def _data(cfg: Config) -> None:
    _check(cfg.data.source.strip() != "", "data.source is empty; use a built-in data set (drugreview, sotu) or a data file path")
    _check(0 < cfg.data.eval_fraction < 1, f"data.eval_fraction must be in (0, 1) (got {cfg.data.eval_fraction})")
    _check(cfg.data.dirichlet_alpha > 0, f"data.dirichlet_alpha must be > 0 (got {cfg.data.dirichlet_alpha})")
    _check(cfg.data.max_eval_examples >= 0, "data.max_eval_examples must be >= 0 (0 = all)")


def _train(cfg: Config) -> None:
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


def _privacy(cfg: Config) -> None:
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


def _client_dp(cfg: Config) -> None:
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


def _secagg(cfg: Config) -> None:
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
        _colluders(g, cfg.clients_per_round)
        _check(2 <= g.min_inputs <= cfg.clients_per_round, f"secagg.min_inputs must be in 2..{cfg.clients_per_round} "
               f"(the clients per round; got {g.min_inputs}): a sum of one input is that input")


def _colluders(g, n: int) -> None:
    """c colluders need t >= floor((k + c)/2) + 1 <= k (then the quorum floor((n + c)/2) + 1 <= n too)."""
    k = min(g.degree, n - 1)
    _check(0 <= g.colluders < k, f"secagg.colluders must be in 0..{k - 1} with {n} clients per round and "
           f"{k} neighbours each (got {g.colluders}): t must exceed (k + colluders)/2 and stay <= k")
    need = (k + g.colluders) // 2 + 1
    _check(g.threshold == 0 or g.threshold >= need, f"secagg.threshold = {g.threshold} is below the {need} that "
           f"secagg.colluders = {g.colluders} needs with {k} neighbours; set it to 0 (automatic) or >= {need}")


def _audit(cfg: Config) -> None:
    a = cfg.audit
    _check(a.canaries >= 0 and a.secrets >= 0, "audit.canaries and audit.secrets must be >= 0")
    _check(a.canaries == 0 or a.canaries >= 10, f"audit.canaries must be 0 or at least 10 (got {a.canaries})")
    _check(a.canary_words >= 2, f"audit.canary_words must be >= 2 (got {a.canary_words})")
    _check(1 <= a.secret_digits <= 6, f"audit.secret_digits must be in 1..6 (got {a.secret_digits})")
    _check(a.secret_repeats >= 1, f"audit.secret_repeats must be >= 1 (got {a.secret_repeats})")
    _check(a.canary_records == 1 or (a.canary_records > 1 and cfg.privacy.unit == "user"),
           f"audit.canary_records = {a.canary_records} plants canary people with several records, which only "
           "privacy.unit = \"user\" protects as one; set it to 1 or use the user unit")


def _federation(cfg: Config) -> None:
    f = cfg.federation
    _check(f.clients >= 1, f"federation.clients must be >= 1 (got {f.clients})")
    _check(f.rounds >= 1, f"federation.rounds must be >= 1 (got {f.rounds})")
    _check(f.clients_per_round >= 0, "federation.clients_per_round must be >= 0 (0 = all)")
    _check(0 <= f.min_clients <= cfg.num_clients, f"federation.min_clients must be in 0..{cfg.num_clients} (got "
           f"{f.min_clients}); 0 = every client selected for the round")
    _check(f.round_timeout > 0, "federation.round_timeout must be > 0 seconds")
    _check(f.stage_timeout > 0, f"federation.stage_timeout must be > 0 seconds (got {f.stage_timeout}); it bounds each "
           "SecAgg+ key stage, 60 s by default")
    _check(f.server_lr >= 0 and math.isfinite(f.server_lr), f"federation.server_lr must be >= 0 (got {f.server_lr}); 0 = default")
    _check(0 <= f.server_momentum < 1, f"federation.server_momentum must be in [0, 1) (got {f.server_momentum})")
    _check(0 <= f.server_beta2 < 1, f"federation.server_beta2 must be in [0, 1) (got {f.server_beta2})")
    _check(f.server_tau > 0, f"federation.server_tau must be > 0 (got {f.server_tau})")
    _check(f.server_optimizer == "none" or f.mode != "local",
           f"federation.server_optimizer={f.server_optimizer} needs an aggregate, which local mode never makes; "
           "set it to none or federation.mode = federated")


def _simulation(cfg: Config) -> None:
    s = cfg.simulation
    _check(s.client_cpus >= 1, f"simulation.client_cpus must be a whole number >= 1 (got {s.client_cpus})")
    _check(s.client_gpus == -1 or 0 <= s.client_gpus <= 1, "simulation.client_gpus must be -1 (auto) or in [0, 1]")
    _check(s.total_cpus >= 0, "simulation.total_cpus must be >= 0 (0 = all cores)")


def _check_aggregation(cfg: Config) -> None:
    """The method table in fedtune/aggregation.py (and the README) decides what combines."""
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
