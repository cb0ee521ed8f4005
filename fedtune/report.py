"""The run's report: summary.md (for people), summary.json (for programs) and
perplexity.png, built from the run folder alone (metrics.jsonl, run.json, ledgers)."""

from __future__ import annotations

import math
from pathlib import Path

from fedtune import config
from fedtune.floor import FAILED
from fedtune.headline import same_records
from fedtune.privacy import Ledger
from fedtune.runfolder import atomic_write_bytes, atomic_write_text, read_json, read_jsonl, server_ledger_path, write_json

PLOT = "perplexity.png"


def _fmt(x, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def summarize(run_dir: Path) -> dict:
    """Numbers for the report, from the run folder."""
    run = read_json(run_dir / "run.json")
    cfg = config.to_nested(config.load(run_dir / "config.toml"))  # the typed config, as plain sections
    rows = read_jsonl(run_dir / "metrics.jsonl")
    rounds = [r for r in rows if r["phase"] == "round"]
    evals = [r for r in rows if r["phase"] == "evaluate" and r.get("status") == "ok" and "perplexity" in r]
    trains = [r for r in rows if r["phase"] == "train"]
    base = next((r for r in rounds if r["round"] == 0), {})
    final = rounds[-1] if rounds else {}
    clients: dict[str, dict] = {}
    for r in evals:
        c = clients.setdefault(r["client"], {"client": r["client"]})
        if r["round"] == 0:
            c["base_perplexity"] = r["perplexity"]
        c["final_perplexity"] = r["perplexity"]
        c["heldout_records"] = r["num-examples"]
    for r in trains:
        c = clients.setdefault(r["client"], {"client": r["client"]})
        c["rounds_trained"] = c.get("rounds_trained", 0) + (r["status"] == "ok")
        c["refusals"] = c.get("refusals", 0) + (r["status"] == "refused")
        c["failures"] = c.get("failures", 0) + (r["status"] in ("failed", "rejected"))
        if r["status"] == "ok":
            if "num-examples" in r:  # under secure aggregation the server does not learn it
                c["train_records"] = r["num-examples"]
            if "epsilon" in r:  # under secure aggregation the ledger says it
                c["epsilon"] = r["epsilon"]
    for name, c in clients.items():
        ledger = Ledger(run_dir / "clients" / name / "ledger.jsonl")
        if ledger.path.exists():  # in simulation the ledgers are local; in deployment they are not
            plan = ledger.plan() or {}
            spends = ledger.spends()
            c.update(ledger=str(ledger.path.relative_to(run_dir)), noise_multiplier=plan.get("noise_multiplier"),
                     sample_rate=plan.get("sample_rate"), steps_per_round=plan.get("steps_per_round"),
                     budget=plan.get("budget"), seeded=plan.get("seeded", False), unit=plan.get("unit"),
                     covers=plan.get("covers"), not_covered=plan.get("not_covered"), train=plan.get("train"),
                     epsilon=spends[-1]["epsilon"] if spends else 0.0)
            c.setdefault("train_records", plan.get("dataset_size"))
    same = same_records([r for r in rows if r["phase"] == "evaluate"], final.get("round", 0))
    base_ppl, final_ppl = base.get("perplexity"), final.get("perplexity")
    if same["missing_clients"]:  # not the pooled round rows: those cover different records
        base_ppl, final_ppl = same["base_perplexity"], same["final_perplexity"]
    change = (final_ppl / base_ppl - 1.0) if base_ppl and final_ppl else None
    failures = [{k: r.get(k) for k in ("round", "phase", "client", "status", "reason")}
                for r in rows if r["phase"] in ("train", "evaluate") and r.get("status") in FAILED]
    return {
        **same, "failures": failures,
        "run": run, "config": cfg, "rounds": rounds, "clients": sorted(clients.values(), key=lambda c: c["client"]),
        # the config says so even when the clients' ledgers are elsewhere (deployment)
        "seeded": cfg["privacy"].get("seed", -1) >= 0 or any(c.get("seeded") for c in clients.values()),
        "base_perplexity": base_ppl, "final_perplexity": final_ppl, "relative_change": change,
        "client_level": _client_level(run_dir),
        "personalization": read_json(run_dir / "personalization.json") if (run_dir / "personalization.json").exists() else None,
    }


def _client_level(run_dir: Path) -> dict | None:
    """The server's client-level (DP-FedAvg) guarantee, if the run had one."""
    ledger = Ledger(server_ledger_path(run_dir))
    if not ledger.path.exists():
        return None
    plan, spends = ledger.plan() or {}, ledger.spends()
    keys = ("unit", "covers", "not_covered", "noise_multiplier", "sample_rate", "clip_norm", "delta", "accountant", "budget",
            "mechanism")
    return {**{k: plan.get(k) for k in keys}, "epsilon": spends[-1]["epsilon"] if spends else 0.0,
            "rounds": len(spends), "ledger": str(ledger.path.relative_to(run_dir)),
            "distributed": bool(plan.get("ddg")), "clients_in_sum": [e.get("clients_in_sum") for e in spends]}


def _plot(s: dict, path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    rounds = [r for r in s["rounds"] if r.get("perplexity") is not None]
    ax.plot([r["round"] for r in rounds], [r["perplexity"] for r in rounds], "o-", lw=2.5, color="black",
            label="all clients (pooled)")
    run_dir = path.parent
    per_client: dict[str, list[tuple[int, float]]] = {}
    for r in read_jsonl(run_dir / "metrics.jsonl"):
        if r["phase"] == "evaluate" and r.get("status") == "ok":
            per_client.setdefault(r["client"], []).append((r["round"], r["perplexity"]))
    for name, pts in sorted(per_client.items()):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], ".--", lw=1, alpha=0.7, label=name)
    ax.set_xlabel("round (0 = base model)")
    ax.set_ylabel("held-out perplexity")
    ax.set_xticks([r["round"] for r in rounds])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(s["config"]["run"]["name"], fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _failures(s: dict) -> list[str]:
    """Every client that failed or was rejected, with its reason, and the run's error."""
    lines = []
    if s["run"].get("status") == "failed":
        lines += [f"**The run failed:** {s['run'].get('error', 'see flower.log')}", ""]
    if s.get("failures"):
        lines += ["## Failures", "", "| round | phase | client | status | reason |", "|---|---|---|---|---|"]
        lines += [f"| {f['round']} | {f['phase']} | {f['client']} | {f['status']} | {f['reason']} |" for f in s["failures"]]
        lines.append("")
    return lines


def render(s: dict) -> str:
    cfg, run = s["config"], s["run"]
    p, f = cfg["privacy"], cfg["federation"]
    lines = [f"# fedtune run: {cfg['run']['name']}", ""]
    dp = (f"record-level DP-SGD, target ε = {p['epsilon']:g} at δ = {p['delta']:g} ({p['accountant'].upper()} accountant), "
          f"clip norm {p['clip_norm']:g}") if p["dp"] else "**no differential privacy** (ε = ∞; a baseline)"
    clients = 1 if f["mode"] == "centralized" else f["clients"]
    lines += [
        f"- status: **{run.get('status')}** · mode: {f['mode']} · {clients} client(s) · {f['rounds']} round(s)",
        f"- model: {cfg['model']['name']} + LoRA r={cfg['lora']['r']} on {cfg['lora']['target_modules']}",
        f"- data: {cfg['data']['source']} (partition: {cfg['data']['partition']}"
        + (f" by {cfg['data']['partition_by']})" if cfg["data"]["partition"] != "iid" else ")"),
        f"- privacy: {dp}", "",
    ]
    if s.get("seeded"):
        lines += ["> **Warning: privacy.seed was set.** DP noise, sampling and secure-aggregation rounding were "
                  "reproducible, so no privacy guarantee in this report holds for this run. Use seeds for tests only.", ""]
    b, fin, ch = s["base_perplexity"], s["final_perplexity"], s["relative_change"]
    if b is not None and fin is not None:
        lastround = s["rounds"][-1]["round"]
        what = "lower" if fin < b else "higher"
        missing = s.get("missing_clients") or {}
        over = (f"the {len(s['compared_clients'])} client(s) that evaluated both models ({s['compared_tokens']} tokens;"
                f" not compared: {', '.join(f'{c}, {why}' for c, why in missing.items())})" if missing
                else "every client's held-out records (pooled)")
        lines += ["## Result", "",
                  f"Held-out perplexity over {over}: base model **{b:.2f}** → "
                  f"**{fin:.2f}** after round {lastround}, {abs(ch) * 100:.1f}% {what} than the base model.", "",
                  f"![held-out perplexity per round]({PLOT})", ""]
    lines += _failures(s)
    lines += ["| round | perplexity | held-out loss | clients trained | refused | failed/rejected | seconds |",
              "|---|---|---|---|---|---|---|"]
    for r in s["rounds"]:
        lines.append(f"| {r['round']} | {_fmt(r.get('perplexity'))} | {_fmt(r.get('eval-loss'), 4)} | {r.get('trained', '–')} "
                     f"| {r.get('refused', '–')} | {r.get('failed', 0) + r.get('rejected', 0) if 'trained' in r else '–'} "
                     f"| {_fmt(r.get('seconds'), 1)} |")
    lines += ["", "## Clients", "",
              "| client | train records | held-out records | perplexity base → final | ε spent | budget | rounds trained | refusals |",
              "|---|---|---|---|---|---|---|---|"]
    for c in s["clients"]:
        lines.append(
            f"| {c['client']} | {c.get('train_records', '–')} | {c.get('heldout_records', '–')} | "
            f"{_fmt(c.get('base_perplexity'))} → {_fmt(c.get('final_perplexity'))} | {_fmt(c.get('epsilon'))} | "
            f"{_fmt(c.get('budget'))} | {c.get('rounds_trained', 0)} | {c.get('refusals', 0)} |")
    lines += _privacy_lines(s, p) + _client_level_lines(s) + _after_lines(s)
    return "\n".join(lines)


def _privacy_lines(s: dict, p: dict) -> list[str]:
    """Record-level DP: the unit, the guarantee, what it covers, each client's spend."""
    lines = ["", "## Privacy", ""]
    if p["dp"]:
        first = next((c for c in s["clients"] if c.get("unit")), {})
        lines += [
            f"- **Unit protected:** {first.get('unit', 'one training record of a client')}.",
            f"- **Guarantee:** each client's ({'ε, δ'})-DP at δ = {p['delta']:g}, ε as listed per client, composed over every "
            f"local step of every round the client trained in ({p['accountant'].upper()}, Opacus).",
            f"- **Covers:** {first.get('covers', 'the adapter updates each client sends')}.",
            f"- **Not covered:** {first.get('not_covered', 'metrics')}.",
            "- Each client's spends are in its hash-chained ledger (`clients/<name>/ledger.jsonl`), written and fsync'ed "
            "before its update leaves the client.", "",
            "| client | noise multiplier σ | sample rate q | steps per round | ε spent | ledger |", "|---|---|---|---|---|---|"]
        for c in s["clients"]:
            lines.append(f"| {c['client']} | {_fmt(c.get('noise_multiplier'), 3)} | {_fmt(c.get('sample_rate'), 4)} | "
                         f"{c.get('steps_per_round', '–')} | {_fmt(c.get('epsilon'))} | {c.get('ledger', '–')} |")
        lines += train_choice_lines(s["clients"])
    else:
        lines += ["This run trained **without** record-level differential privacy: nothing bounds what the clients' "
                  "updates reveal about any record."]
    return lines


def _client_level_lines(s: dict) -> list[str]:
    """The server's client-level DP guarantee, if the run had one."""
    lines: list[str] = []
    cl = s.get("client_level")
    if cl:
        if cl.get("distributed"):
            title, noise = ("Client-level DP, distributed (the clients add the noise under SecAgg+)",
                            f"discrete Gaussian noise from each client, together at least σ = "
                            f"{_fmt(cl['noise_multiplier'], 3)} on the sum; clients in each round's sum: "
                            f"{', '.join(str(n) for n in cl['clients_in_sum']) or '–'}")
        else:
            title, noise = "Client-level DP (DP-FedAvg)", f"noise σ = {_fmt(cl['noise_multiplier'], 3)} on the sum"
        lines += ["", f"### {title}", "",
                  f"- **Unit protected:** {cl['unit']}.",
                  f"- **Guarantee:** ε = {_fmt(cl['epsilon'])} at δ = {cl['delta']:g} after {cl['rounds']} round(s) "
                  f"({cl['accountant'].upper()}; budget {_fmt(cl['budget'])}): client sampling q = {_fmt(cl['sample_rate'], 3)}, "
                  f"update clip C = {cl['clip_norm']:g}, {noise}.",
                  f"- **Covers:** {cl['covers']}.", f"- **Not covered:** {cl['not_covered']}.",
                  f"- The server's spends are in `{cl['ledger']}`. Check everything with `fedtune audit --verify`."]
    return lines


def _after_lines(s: dict) -> list[str]:
    """Personalization, baselines and the run folder's files."""
    lines: list[str] = []
    pers = s.get("personalization")
    if pers:
        avg, worst = pers["average"], pers["worst"]
        lines += ["", "## Personalization", "",
                  f"Method **{pers['method']}**: held-out perplexity averaged over clients: global {avg['global']:.2f} → "
                  f"personalized {avg['personalized']:.2f} (local-only {avg['local']:.2f}, base {avg['base']:.2f}); "
                  f"worst client: global {worst['global']:.2f} → personalized {worst['personalized']:.2f}. "
                  "Per client: [personalization.md](personalization.md)."]
    comparison = s.get("comparison")
    if comparison:
        lines += ["", "## Baselines (same data, same held-out records)", "",
                  "| run | what it is | final perplexity | vs base | ε |", "|---|---|---|---|---|"]
        for row in comparison:
            lines.append(f"| {row['label']} | {row['what']} | {_fmt(row['final_perplexity'])} | "
                         f"{_fmt(row['relative_change'] * 100 if row['relative_change'] is not None else None, 1)}% | "
                         f"{_fmt(row['epsilon'])} |")
    lines += ["", "Files: `metrics.jsonl` (per client, per round), `adapters/` (PEFT adapter folders), "
              "`config.toml` (the resolved config), `summary.json`.", ""]
    return lines


def train_choice_lines(clients: list[dict]) -> list[str]:
    """Each client's batch size and learning rate, and why when fedtune chose them (DP-aware defaults)."""
    out = []
    for c in clients:
        t = c.get("train") or {}
        if t:
            why = (t.get("choice") or {}).get("why", "set in the config")
            out.append(f"- {c['client']}: expected batch {t['batch_size']}, learning rate {t['learning_rate']:g}: {why}.")
    return ["", "**Training settings:**", ""] + out if out else []


def write_summary(run_dir: str | Path, comparison: list[dict] | None = None) -> dict:
    run_dir = Path(run_dir)
    s = summarize(run_dir)
    if comparison is None and (run_dir / "summary.json").exists():  # a rewrite keeps the baseline table
        comparison = read_json(run_dir / "summary.json").get("comparison")
    if comparison:
        s["comparison"] = comparison
    if any(r.get("perplexity") is not None for r in s["rounds"]):
        _plot(s, run_dir / PLOT)
    atomic_write_text(run_dir / "summary.md", render(s))
    write_json(run_dir / "summary.json", {k: v for k, v in s.items() if k != "config"})
    return s
