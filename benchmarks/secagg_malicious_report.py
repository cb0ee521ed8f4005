"""The result file of bench_secagg_malicious.py: the table, where the added time goes, the targets."""

from __future__ import annotations

from typing import Any

from bench_secagg import size_label


def markdown(result: dict[str, Any]) -> str:
    a = result["args"]
    out = [
        "# SecAgg+ secure against a malicious server: added cost over honest-but-curious\n",
        f"One round, both variants side by side in one process, same inputs (normal(0, {a['scale']}) updates, weights "
        f"1..{a['max_weight']}), {a['bits']}-bit weighted fixed point, neighbour degree {a['degree']}, no dropouts; "
        f"identity keys: {a['identity']} (Ed25519{', certified by P-384 SuperNode keys' if a['identity'] == 'deployment' else ''}). {result['machine']}. {result['load']}. {result['note']}.\n",
        "Times are CPU seconds of the benchmark process (wall-clock on this shared machine measured the other "
        "jobs). Method: the two variants' rounds run in lockstep, so each client's answer to a stage in one variant "
        "runs right before or after (order alternating by run) the same answer in the other; per run, the added "
        "time is the median over clients of each client's malicious minus honest time; the table gives the median "
        "over runs, its quartiles and range across runs, and, as a cross-check, the same from each client's fastest "
        "run of each variant. Client s = median client (median over runs), all stages (the malicious variant adds "
        "identify, graph, the coin-toss check, "
        "signatures and their checks, the consistency stage). Upload ratio = largest client's upload, all stages, "
        "over its fp32 update (target ≤ 1.1). Extra KB = the largest client's added upload / download "
        "(target: under 10 KB per client). Both variants' sums were checked equal.\n",
        "| params | clients | runs each | client s honest / malicious | added (% of honest round) | quartiles / range "
        "across runs (%) | fastest-run cross-check | server s honest / malicious | upload ratio | extra KB up / down |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in result["cases"]:
        cl, sv, ex = c["client_s"], c["server_s"], c["extra_bytes_per_client"]
        pct = lambda xs, h=cl["honest"]: "–".join(f"{100 * x / h:.1f}" for x in xs)  # noqa: E731
        out.append(f"| {size_label(c['params'])} | {c['clients']} | {c['runs_each']} | {cl['honest']:.3f} / {cl['malicious']:.3f} "
                   f"| {1e3 * cl['added_median']:.1f} ms ({c['client_added_pct']:.1f}%) | {pct(cl['added_quartiles'])} / "
                   f"{pct(cl['added_range'])} | {1e3 * cl['fastest_added']:.1f} ms "
                   f"({100 * cl['fastest_added'] / cl['fastest_honest']:.1f}%) | {sv['honest']:.2f} / "
                   f"{sv['malicious']:.2f} | {c['upload_ratio_fp32']:.3f} | {ex['upload'] / 1e3:.2f} / "
                   f"{ex['download'] / 1e3:.2f} |")
    out += breakdown(result) + verdict(result["cases"])
    out.append("\nPer-run added times and per-case details are in secagg_malicious.json.\n")
    return "\n".join(out)


def breakdown(result: dict[str, Any]) -> list[str]:
    """Where the added client time goes: by stage, and the primitives behind it."""
    stages, counted = list(result["cases"][0]["added_by_stage_s"]), list(result["cases"][0]["primitives_per_client"])
    out = ["\nWhere the added client time goes: per stage, the median client's malicious minus honest time in ms "
           "(paired as above: median over runs of the median client; medians, so they need not add up to the "
           "total; collect carries most of the machine's noise, being most of the round), and the primitives the malicious variant adds, per "
           "client (median; Ed25519 signatures and their checks, pairwise tags and their checks), with their CPU "
           "time in all (timed around each call, in one more malicious round of 1,000 values: what a client signs "
           "and checks does not depend on the update's size):\n",
           "| params | clients | " + " | ".join(stages) + " | " + " / ".join(counted) + " | their ms |",
           "|---|---|" + "---|" * (len(stages) + 2)]
    for c in result["cases"]:
        by, n = c["added_by_stage_s"], c["primitives_per_client"]
        out.append(f"| {size_label(c['params'])} | {c['clients']} | " + " | ".join(f"{1e3 * by[s]:+.2f}" for s in stages)
                   + " | " + " / ".join(f"{n[k]:g}" for k in counted)
                   + f" | {1e3 * sum(c['primitives_s_per_client'].values()):.2f} |")
    return out


def verdict(cases: list[dict[str, Any]]) -> list[str]:
    """The targets, case by case, from the figures above."""
    def name(c):
        return f"{size_label(c['params'])}/{c['clients']}"
    over = [name(c) for c in cases if c["client_added_pct"] > 10]
    shaky = "; ".join(f"not robustly at {name(c)}: a quarter of its runs above "
                      f"{100 * c['client_s']['added_quartiles'][1] / c['client_s']['honest']:.1f}%, the fastest-run "
                      f"cross-check {100 * c['client_s']['fastest_added'] / c['client_s']['fastest_honest']:.1f}%"
                      for c in cases if c["client_added_pct"] <= 10 and (
                          c["client_s"]["added_quartiles"][1] > 0.1 * c["client_s"]["honest"]
                          or c["client_s"]["fastest_added"] > 0.1 * c["client_s"]["fastest_honest"]))
    prim = ", ".join(f"{name(c)} {100 * sum(c['primitives_s_per_client'].values()) / c['client_s']['honest']:.1f}%"
                     for c in cases)
    return ["\nAgainst the targets: upload ≤ 1.1× fp32 " + ("met" if all(c["upload_ratio_fp32"] <= 1.1 for c in cases)
            else "MISSED") + f" (at most {max(c['upload_ratio_fp32'] for c in cases):.3f}); extra messages under 10 KB "
            "per client " + ("met" if all(max(c["extra_bytes_per_client"].values()) < 1e4 for c in cases) else "MISSED")
            + f" (at most {max(max(c['extra_bytes_per_client'].values()) for c in cases) / 1e3:.2f} KB); client time "
            "added ≤ 10% of the honest secure round (median over runs): " + (f"MISSED at {', '.join(over)}" if over
                                                                             else "met in every case")
            + (f" ({shaky})" if shaky else "") + ". "
            f"The added primitives alone (timed call by call, so nearly free of the machine's noise) take, as a share "
            f"of the honest round: {prim}."]
