"""The run's headline, "held-out perplexity: base X -> Y", on the same held-out records.

The base model (round 0) and the final model are compared only over the clients that
evaluated both: a client that failed to evaluate one of them is left out of both numbers
and named, so a model is never measured on fewer (or easier) records than its baseline.
"""

from __future__ import annotations

import math


def _pooled(rows: list[dict]) -> float | None:
    tokens = sum(r["eval-tokens"] for r in rows)
    if not tokens:
        return None
    return math.exp(min(sum(r["eval-loss-sum"] for r in rows) / tokens, 50.0))


def same_records(evals: list[dict], final_round: int) -> dict:
    """Base and final perplexity pooled over the clients with an ``ok`` evaluation in round 0
    and in ``final_round``; which clients are missing from the comparison and why."""
    ok = [r for r in evals if r.get("status") == "ok" and "eval-tokens" in r]
    base = {r["client"]: r for r in ok if r["round"] == 0}
    final = {r["client"]: r for r in ok if r["round"] == final_round}
    both = sorted(set(base) & set(final))
    why = {(True, False): "no evaluation of the final model", (False, True): "no evaluation of the base model",
           (False, False): "no evaluation of either model"}
    everyone = {r["client"] for r in evals if r["round"] in (0, final_round)}
    missing = {c: why[c in base, c in final] for c in everyone if c not in both}
    return {
        "base_perplexity": _pooled([base[c] for c in both]),
        "final_perplexity": _pooled([final[c] for c in both]),
        "compared_clients": both,
        "compared_tokens": sum(final[c]["eval-tokens"] for c in both),
        "missing_clients": dict(sorted(missing.items())),
    }


def headline(s: dict) -> str | None:
    """One line for the console: base -> final on the same records, naming any client left out."""
    b, f = s.get("base_perplexity"), s.get("final_perplexity")
    if b is None or f is None:
        return None
    line = f"held-out perplexity: base {b:.2f} -> {f:.2f} ({(f / b - 1) * 100:+.1f}%)"
    missing = s.get("missing_clients") or {}
    if missing:
        line += (f" on the same {s.get('compared_tokens', 0)} tokens of {len(s.get('compared_clients', []))} client(s);"
                 f" not compared: {', '.join(f'{c} ({why})' for c, why in missing.items())}")
    return line
