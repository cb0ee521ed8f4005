"""`fedtune audit`: what every client spent, protecting what, and whether it checks out.

From a run folder alone: each client's ledger (record-level DP-SGD) and the server's
(client-level DP-FedAvg). ``verify`` recomputes every recorded ε from the entry's raw
parameters with a second, independent accountant (Google's dp-accounting), checks that
each plan's σ keeps its planned rounds within the target, and checks every spend against
the ledger head the server recorded when the update arrived, and every update the server
received (fedtune.receipts) against a spend in that client's ledger. The hash chains are always
checked: a damaged ledger is an error naming its file and line.
"""

from __future__ import annotations

import math
from pathlib import Path

from fedtune import receipts, revealed
from fedtune.errors import FedtuneError
from fedtune.privacy.accounting import epsilon_independent
from fedtune.privacy.distributed import DDGPlan
from fedtune.privacy.ledger import Ledger
from fedtune.privacy.user_level import check_user_plan
from fedtune.runfolder import (
    RUN_FILE, atomic_write_bytes, atomic_write_text, is_run_dir, read_jsonl, server_ledger_path, write_json,
)

SHORT_UNIT = {"record": "one record", "user": "one person", "client": "one client"}  # by ledger level
RDP_TOLERANCE = 1e-3  # relative: the same RDP bound computed twice
PRV_TOLERANCE = 0.02  # absolute: Opacus' PRV (ε error bound 0.01) against dp-accounting's PLD


def _ledgers(run_dir: Path) -> list[tuple[str, Ledger]]:
    out = [(p.parent.name, Ledger(p)) for p in sorted((run_dir / "clients").glob("*/ledger.jsonl"))]
    if server_ledger_path(run_dir).exists():
        out.append(("server", Ledger(server_ledger_path(run_dir))))
    return out


def _row(name: str, ledger: Ledger, entries: list[dict]) -> dict:
    plan = next((e for e in entries if e["type"] == "plan"), None)
    if plan is None and entries and all(e["type"] == "refusal" for e in entries):
        return _refused_before_planning(name, ledger, entries)
    if plan is None:
        raise FedtuneError(f"{ledger.path}:1: ledger has no plan entry; it was not written by fedtune")
    spends = [e for e in entries if e["type"] == "spend"]
    spent = spends[-1]["epsilon"] if spends else 0.0
    return {
        "client": name, "level": "client" if name == "server" else plan.get("privacy_unit", "record"),
        "unit": plan.get("unit", ""),
        "dp": plan["dp"], "accountant": plan["accountant"], "delta": plan["delta"], "epsilon": spent,
        "budget": plan["budget"], "remaining": plan["budget"] - spent if plan["dp"] else math.inf,
        "rounds_joined": len(spends), "steps": sum(e["steps"] for e in spends),
        "sample_rate": plan["sample_rate"], "noise_multiplier": plan["noise_multiplier"], "clip_norm": plan["clip_norm"],
        "refusals": sum(e["type"] == "refusal" for e in entries), "seeded": plan.get("seeded", False),
        "epsilon_per_round": [[e["round"], e["epsilon"]] for e in spends],
        "ledger": str(ledger.path),
    }


def _refused_before_planning(name: str, ledger: Ledger, entries: list[dict]) -> dict:
    """A client that refused the run at its first message (its policy): nothing planned or spent."""
    return {"client": name, "level": "record", "unit": "nothing planned: the client refused the run", "dp": True,
            "accountant": "", "delta": 0.0, "epsilon": 0.0, "budget": 0.0, "remaining": 0.0, "rounds_joined": 0,
            "steps": 0, "sample_rate": 0.0, "noise_multiplier": 0.0, "clip_norm": 0.0, "refusals": len(entries),
            "seeded": False, "epsilon_per_round": [], "ledger": str(ledger.path)}


def _verify(name: str, ledger: Ledger, entries: list[dict], heads: dict[tuple[str, int], str]) -> list[str]:
    """Every discrepancy as 'file:line: what'."""
    problems = []
    if not any(e["type"] == "plan" for e in entries):  # refused before planning: nothing to recompute
        return [f"{ledger.path}:{i}: a {e['type']} entry without a plan" for i, e in enumerate(entries, 1)
                if e["type"] != "refusal"]
    plan_line, plan = next(((i, e) for i, e in enumerate(entries, 1) if e["type"] == "plan"))
    if plan["dp"]:
        planned = [(plan["noise_multiplier"], plan["sample_rate"], plan["steps_per_round"])] * plan["planned_rounds"]
        eps_planned = epsilon_independent(planned, plan["delta"], plan["accountant"])
        if plan.get("calibrated") and eps_planned > plan["target_epsilon"] * (1 + RDP_TOLERANCE) + 1e-9:
            problems.append(f"{ledger.path}:{plan_line}: σ={plan['noise_multiplier']:.4g} gives ε={eps_planned:.4f} "
                            f"over the planned {plan['planned_rounds']} rounds, above the target {plan['target_epsilon']:g}")
    if plan.get("privacy_unit") == "user":
        problems += [f"{ledger.path}:{plan_line}: {p}" for p in check_user_plan(plan)]
    ddg = DDGPlan.from_dict(plan["ddg"]) if plan.get("ddg") else None
    history = []
    for line, e in enumerate(entries, 1):
        if e["type"] != "spend":
            continue
        if ddg is not None:  # distributed DP: σ_eff must follow from the noise of the clients in the sum
            n = int(e.get("clients_in_sum", 0))
            if n < ddg.min_clients:
                problems.append(f"{ledger.path}:{line}: round {e['round']} released a sum of {n} clients' noise, "
                                f"fewer than the plan's min_clients={ddg.min_clients}")
            elif abs(ddg.noise_multiplier(n) / e["noise_multiplier"] - 1) > 1e-9:
                problems.append(f"{ledger.path}:{line}: recorded σ_eff {e['noise_multiplier']:.6g} for {n} clients, but "
                                f"the plan's noise gives {ddg.noise_multiplier(n):.6g}")
        history.append((e["noise_multiplier"], e["sample_rate"], e["steps"]))
        if e.get("dp", True):
            again = epsilon_independent(history, e["delta"], e["accountant"])
            ok = (abs(again / e["epsilon"] - 1) <= RDP_TOLERANCE if e["accountant"] == "rdp"
                  else abs(again - e["epsilon"]) <= PRV_TOLERANCE) if e["epsilon"] > 0 else again == 0
            if not ok:
                problems.append(f"{ledger.path}:{line}: recorded ε {e['epsilon']:.6g} for round {e['round']}, but "
                                f"dp-accounting recomputes {again:.6g} from its σ, q and steps")
        if (name, e["round"]) in heads and heads[(name, e["round"])] != e["hash"]:
            problems.append(f"{ledger.path}:{line}: round {e['round']} does not match the ledger head the server "
                            "recorded when the update arrived (the ledger was rewritten)")
    return problems


def _refusals(rows: list[dict], entries: dict[str, tuple[Ledger, list[dict]]]) -> list[dict]:
    """Every refused round, as the server recorded it (metrics.jsonl: in deployment the
    clients keep their ledgers) and as the refusing ledger records it (when at hand)."""
    out: dict[tuple[str, int], dict] = {}
    for r in rows:
        if r.get("phase") == "train" and r.get("status") == "refused":
            out[(r["client"], r["round"])] = {"client": r["client"], "round": r["round"], "reason": r.get("reason", ""),
                                              "recorded_by": ["server"]}
    for name, (_, ledger_entries) in entries.items():
        for e in ledger_entries:
            if e["type"] == "refusal":
                row = out.setdefault((name, e["round"]), {"client": name, "round": e["round"], "reason": e["reason"],
                                                          "recorded_by": []})
                if "ledger" not in row["recorded_by"]:
                    row["recorded_by"].append("ledger")
    return sorted(out.values(), key=lambda r: (r["round"], r["client"]))


def _unconfirmed(refusals: list[dict], entries: dict[str, tuple[Ledger, list[dict]]]) -> list[str]:
    """Refusals the server recorded that the client's ledger (when at hand) does not."""
    return [f"{entries[r['client']][0].path}: the server recorded {r['client']} refusing round {r['round']}, but its "
            "ledger has no refusal for that round" for r in refusals
            if r["recorded_by"] == ["server"] and r["client"] in entries]


def run_audit(run_dir: str | Path, verify: bool = False, empirical: bool = False) -> dict:
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise FedtuneError(f"{run_dir} is not a fedtune run folder (no {RUN_FILE}); pass the folder `fedtune simulate` printed")
    ledgers = _ledgers(run_dir)
    if not ledgers:
        raise FedtuneError(f"{run_dir} holds no privacy ledger (clients/*/ledger.jsonl); was the run started?")
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    heads = {(r["client"], r["round"]): r["ledger_head"]
             for r in metrics if r.get("phase") == "train" and r.get("ledger_head")}
    rows, problems, entries = [], [], {}
    for name, ledger in ledgers:
        entries[name] = (ledger, ledger.entries())  # FedtuneError naming file:line on a broken chain
        rows.append(_row(name, ledger, entries[name][1]))
        if verify:
            problems += _verify(name, ledger, entries[name][1], heads)
    refusals = _refusals(metrics, entries)
    if verify:
        problems += _unconfirmed(refusals, entries)
        trained = any(r.get("phase") == "train" and r.get("status") == "ok" for r in metrics)
        problems += receipts.verify(run_dir, {n: e for n, (_, e) in entries.items() if n != "server"}, trained)
    result = {"run_dir": str(run_dir), "rows": rows, "refusals": refusals, "verified": verify, "problems": problems,
              "revealed": revealed.in_the_clear(metrics)}
    if empirical:
        from fedtune.privacy.empirical import run_empirical  # lazy: torch, only for --empirical

        records = [r for r in rows if r["level"] in ("record", "user")]
        eps = max((r["epsilon"] if r["dp"] else math.inf) for r in records) if records else math.inf
        delta = records[0]["delta"] if records else 1e-5
        result["empirical"] = run_empirical(run_dir, eps, delta)
    write_json(run_dir / "audit.json", result)
    atomic_write_text(run_dir / "audit.md", render(result))
    _plot(rows, run_dir / "epsilon.png")
    return result


def _fmt(x: float, digits: int = 3) -> str:
    return "∞" if isinstance(x, float) and math.isinf(x) else f"{x:.{digits}g}"


def render(result: dict) -> str:
    lines = ["# Privacy audit", "", f"Run: `{result['run_dir']}`", "",
             "| ledger | unit protected | ε spent | δ | budget | remaining | rounds joined | steps | sample rate q "
             "| noise σ | clip C | accountant |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        unit = SHORT_UNIT.get(r["level"], r["level"])
        eps = _fmt(r["epsilon"]) if r["dp"] else "∞ (no DP)"
        lines.append(f"| {r['client']} | {unit} | {eps} | {r['delta']:g} | {_fmt(r['budget'])} | {_fmt(r['remaining'])} | "
                     f"{r['rounds_joined']} | {r['steps']} | {r['sample_rate']:.4g} | {r['noise_multiplier']:.4g} | "
                     f"{r['clip_norm']:g} | {r['accountant'].upper()} |")
    units = {r["level"]: r["unit"] for r in result["rows"]}
    lines += ["", "Units: " + "; ".join(f"**{k}-level**: {v}" for k, v in units.items()) + ".", "",
              "![ε per round](epsilon.png)", ""]
    if result.get("refusals"):
        lines += ["## Refusals", "", "A client (or the server, for client-level DP) declined a round rather than spend "
                  "past its budget; nothing was released for it.", "",
                  "| round | who | reason | recorded by |", "|---|---|---|---|"]
        lines += [f"| {r['round']} | {r['client']} | {r['reason']} | {' and '.join(r['recorded_by'])} |"
                  for r in result["refusals"]]
        lines.append("")
    if result.get("revealed"):
        lines += ["## Revealed in the clear", "", "Numbers clients sent the server outside the noised adapter "
                  "(fedtune.revealed). Only data-independent ones are harmless: a loss is computed from the private "
                  "data and no DP covers it; counts, q, σ, ε and timings give the record count N away, which "
                  "add/remove-one DP treats as private.", "", "| phase | metric | clients | independent of the data |",
                  "|---|---|---|---|"]
        lines += [f"| {r['phase']} | {r['metric']} | {len(r['clients'])} | {'yes' if r['data_independent'] else '**no**'} |"
                  for r in result["revealed"]]
        lines.append("")
    if any(r["seeded"] for r in result["rows"]):
        lines += ["> **privacy.seed was set**: the DP randomness was reproducible, so these ε do not hold.", ""]
    lines += _empirical_md(result.get("empirical")) + _verification_md(result)
    return "\n".join(lines) + "\n"


def _empirical_md(emp: dict | None) -> list[str]:
    """The empirical check's section: the one-run audit and the planted secrets' exposure."""
    if not emp:
        return []
    lines = ["## Empirical check", ""]
    if "one_run" in emp:
        o = emp["one_run"]
        lines += [
            f"One-run audit (Steinke, Nasr, Jagielski 2023): {o['canaries']} canaries, {o['included']} planted by coin "
            f"flip; scored by how much training lowered their loss (AUROC {o['auroc']:.3f}).", "",
            f"- empirical lower bound **ε̂ = {o['epsilon_lower_bound']:.3f}** (95% confidence, δ = {emp['delta']:g})",
            f"- accountant's upper bound **ε = {_fmt(emp['accountant_epsilon'])}**", "",
            "ε̂ ≤ ε is expected: ε̂ is what this attack could prove, ε what the accountant guarantees; "
            "ε̂ > ε would be a violation and would mean a bug in fedtune's DP. "
            + ("**Here ε̂ > ε: a violation. Report it: this is a bug.**" if o["violation"]
               else "Here ε̂ ≤ ε: no violation."), ""]
    if emp.get("secrets"):
        lines += ["Secret Sharer (Carlini et al. 2019): exposure of planted secrets (about 1 bit = not memorized; "
                  "the maximum = recited).", "", "| secret | client | copies | rank | exposure (bits) | max |",
                  "|---|---|---|---|---|---|"]
        for sec in emp["secrets"]:
            lines.append(f"| {sec['id']} | client-{sec['client']} | {sec['repeats']} | {sec['rank']} / {sec['candidates']} "
                         f"| {sec['exposure_bits']:.2f} | {sec['max_exposure_bits']:.2f} |")
        lines.append("")
    return lines


def _verification_md(result: dict) -> list[str]:
    """The section of `audit --verify`: passed, or each problem found."""
    if not result["verified"]:
        return []
    if result["problems"]:
        return ["## Verification FAILED", ""] + [f"- `{p}`" for p in result["problems"]]
    return ["## Verification passed", "",
            "Every recorded ε was recomputed from its σ, q and steps by Google's dp-accounting; every plan's σ "
            "keeps its planned rounds within the target; the hash chains are intact and match the ledger heads "
            "the server recorded; every update the server received (server/receipts.jsonl) has its spend."]


def _plot(rows: list[dict], path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for r in rows:
        pts = [(rd, e) for rd, e in r["epsilon_per_round"] if math.isfinite(e)]
        if pts:
            style = "s-" if r["level"] == "client" else "o--"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{r['client']} ({r['level']}-level)")
            if math.isfinite(r["budget"]):
                ax.axhline(r["budget"], color="grey", lw=0.8, ls=":")
    ax.set_xlabel("round")
    ax.set_ylabel("ε spent (cumulative)")
    ax.grid(alpha=0.3)
    if ax.has_data():
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
