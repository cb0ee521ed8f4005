"""The `fedtune` command.

User mistakes (bad config, data, model...) print one line and exit 2; a run that
starts but fails exits 1; success exits 0.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from fedtune import config as config_mod
from fedtune.config import parse_assignment
from fedtune.deploy.cli import COMMANDS, add_parsers
from fedtune.errors import FedtuneError
from fedtune.export import COMMANDS as EXPORT_COMMANDS
from fedtune.export import add_parsers as add_export_parsers
from fedtune.headline import headline
from fedtune.privacy.defaults import announce_choice
from fedtune.simulate import BASELINES, RunFailed, simulate


def _simulate_parser(sub) -> None:
    p = sub.add_parser(
        "simulate", help="run a federated fine-tuning simulation",
        description="Run N simulated clients through Flower's simulation engine: each fine-tunes LoRA "
                    "adapters with DP-SGD on its own data; the server averages them every round.",
    )
    p.add_argument("config", nargs="?", help="TOML config (default: built-in defaults = simulations/default.toml)")
    p.add_argument("--clients", type=int, help="number of clients (federation.clients)")
    p.add_argument("--rounds", type=int, help="federated rounds (federation.rounds)")
    p.add_argument("--epsilon", help="target ε per client for the whole run (privacy.epsilon); 'inf' = no DP")
    p.add_argument("--no-dp", action="store_true", help="train without differential privacy (a baseline)")
    p.add_argument("--model", help="built-in model name, local model folder or Hugging Face id (model.name)")
    p.add_argument("--data", help="built-in data set name or .jsonl/.csv/.parquet file (data.source)")
    p.add_argument("--output", help="folder for run folders (run.output)")
    p.add_argument("--name", help="run name (run.name)")
    p.add_argument("--mode", choices=["federated", "centralized", "local"], help="federation.mode")
    p.add_argument("--baselines", nargs="?", const="all", metavar="LIST",
                   help="also run baselines and compare: no-dp,centralized,local-only (default: all)")
    p.add_argument("--canaries", type=int, help="plant N canary records for `fedtune audit --empirical` (audit.canaries)")
    p.add_argument("--secrets", type=int, help="plant N secrets for exposure measurement (audit.secrets)")
    p.add_argument("--aggregation", help="fedavg, ffa (A frozen, only B sent) or fedsa (only A sent, B stays local) "
                   "(federation.aggregation)")
    p.add_argument("--personalize", metavar="METHOD", help="after the run: finetune, fedsa or ditto (personalize.method)")
    p.add_argument("--secagg", action="store_true", help="secure aggregation: the server learns only the sum (secagg.enabled)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override any config key")
    p.add_argument("--quiet", action="store_true", help="no progress display")


def _audit_parser(sub) -> None:
    p = sub.add_parser(
        "audit", help="audit a run's privacy spending",
        description="Per client: the unit protected, ε spent at δ, budget and what remains, rounds, steps, sample rate, "
                    "noise and clip norm. Writes audit.json, audit.md and epsilon.png into the run folder.",
    )
    p.add_argument("run_dir", help="a run folder (as printed by fedtune simulate)")
    p.add_argument("--verify", action="store_true",
                   help="recompute every ε with an independent accountant and check the ledgers against the server's record")
    p.add_argument("--empirical", action="store_true",
                   help="score the planted canaries and secrets: an empirical lower bound on ε, and exposure")


def _personalize_parser(sub) -> None:
    p = sub.add_parser(
        "personalize", help="personalize a finished run's global adapter for every client",
        description="Each client adapts the global adapter to its own data ([personalize] in the config; flags "
                    "override it). Writes clients/<client>/personalized/ (PEFT folders) and personalization.md, "
                    ".json and .png (held-out perplexity of base, local-only, global and personalized) into the run folder.",
    )
    p.add_argument("run_dir", help="a run folder (as printed by fedtune simulate)")
    p.add_argument("--method", choices=["finetune", "fedsa", "ditto"], help="personalize.method")
    p.add_argument("--steps", type=int, help="personalize.steps")
    p.add_argument("--no-dp", action="store_true", help="train without DP (personalize.dp = false): never release the result")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override any config key")


def _data_parser(sub) -> None:
    p = sub.add_parser("data", help="prepare client data files")
    dsub = p.add_subparsers(dest="action", required=True)
    e = dsub.add_parser(
        "export", help="write each simulated client's records to a data file for a deployed client",
        description="One .jsonl per client (prompt, completion, split = train | heldout): a deployed client "
                    "given the file trains and evaluates on exactly the records the simulated client of the "
                    "same config would, in the same order.",
    )
    e.add_argument("config", nargs="?", help="TOML config (default: built-in defaults)")
    e.add_argument("--out", required=True, help="folder for the files (<name>.jsonl)")
    e.add_argument("--clients", type=int, help="number of clients (federation.clients)")
    e.add_argument("--data", help="built-in data set name or .jsonl/.csv/.parquet file (data.source)")
    e.add_argument("--names", help="comma-separated client names, one per client (default: client-0, client-1, ...)")
    e.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override any config key")


def _overrides(args) -> dict:
    out: dict = {}
    pairs = {"clients": "federation.clients", "rounds": "federation.rounds", "model": "model.name",
             "data": "data.source", "output": "run.output", "name": "run.name", "mode": "federation.mode",
             "canaries": "audit.canaries", "secrets": "audit.secrets", "aggregation": "federation.aggregation",
             "personalize": "personalize.method"}
    for arg, key in pairs.items():
        if getattr(args, arg) is not None:
            out[key] = getattr(args, arg)
    if args.epsilon is not None:
        if args.epsilon.lower() in ("inf", "infinity", "none"):
            out["privacy.dp"] = False
        else:
            try:
                out["privacy.epsilon"] = float(args.epsilon)
            except ValueError:
                raise FedtuneError(f"--epsilon must be a number or 'inf' (got {args.epsilon!r})") from None
    if args.secagg:
        out["secagg.enabled"] = True
    if args.no_dp:
        out["privacy.dp"] = False
    for item in args.set:
        key, value = parse_assignment(item)
        out[key] = value
    return out


def _baselines(text: str | None) -> list[str]:
    if text is None:
        return []
    names = list(BASELINES) if text == "all" else [n.strip() for n in text.split(",") if n.strip()]
    for n in names:
        if n not in BASELINES:
            raise FedtuneError(f"unknown baseline '{n}'; choose from {', '.join(BASELINES)}")
    return names


# ---- progress ------------------------------------------------------------------------------
def _read(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def make_follower(quiet: bool):
    """A function that shows a run's progress until its log stream process ends."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)

    def follow(run_dir: Path, cfg, logs) -> None:
        rounds = cfg.federation.rounds
        total = 1 + 2 * rounds
        label = run_dir.name
        if quiet or not console.is_terminal:
            last = None
            while logs.poll() is None:
                p = _read(run_dir / "progress.json")
                key = (p.get("round"), p.get("phase"))
                if p and key != last and not quiet:
                    console.print(f"[{time.strftime('%H:%M:%S')}] {label}: round {p['round']}/{rounds} {p['phase']}")
                    last = key
                time.sleep(1.0)
            return
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                      TimeElapsedColumn(), console=console, transient=False) as bar:
            overall = bar.add_task(f"{label}", total=total, info="starting")
            clients: dict[str, int] = {}
            while logs.poll() is None:
                p = _read(run_dir / "progress.json")
                if p:
                    r, phase = p.get("round", 0), p.get("phase", "")
                    done = {"setup": 0, "evaluate": 2 * r, "train": 2 * r - 1, "report": total, "done": total}.get(phase, 0)
                    what = {"evaluate": "evaluating" + (" base model" if r == 0 else ""), "train": "training"}.get(phase, phase)
                    bar.update(overall, completed=done, info=f"round {r}/{rounds} · {what}")
                    for status_file in sorted((run_dir / "clients").glob("*/status.json")):
                        st = _read(status_file)
                        name = status_file.parent.name
                        if name not in clients:
                            clients[name] = bar.add_task(f"  {name}", total=1, info="", start=False)
                        if st.get("round") != r:
                            continue
                        steps = max(1, st.get("steps", 1))
                        if phase == "train":
                            bar.update(clients[name], total=steps, completed=st.get("step", 0),
                                       info=f"round {r}: step {st.get('step', 0)}/{steps}")
                        else:
                            bar.update(clients[name], total=steps, completed=steps, info=f"round {r}: trained")
                time.sleep(1.0)
            bar.update(overall, completed=total)

    return follow


# ---- commands --------------------------------------------------------------------------------
def cmd_simulate(args) -> int:
    cfg = config_mod.load(args.config, _overrides(args))
    baselines = _baselines(args.baselines)
    for sig in (signal.SIGTERM, signal.SIGHUP):  # killed from outside: stop the SuperLink as Ctrl-C does
        signal.signal(sig, _interrupted)
    run_dir = simulate(cfg, baselines, make_follower(args.quiet), None if args.quiet else _announce)
    _print_result(run_dir)
    return 0


def _interrupted(signum, frame):
    raise KeyboardInterrupt


def _announce(cfg, sizes: dict[str, tuple[int, int]]) -> None:
    p = cfg.privacy
    dp = f"DP-SGD ε={p.epsilon:g} δ={p.delta:g} ({p.accountant})" if p.dp else "no DP"
    if cfg.client_dp.enabled:
        c = cfg.client_dp
        how = "distributed DP (noise from the clients, under SecAgg+)" if cfg.secagg.enabled else "DP-FedAvg"
        dp += f", client-level {how} ε={c.epsilon:g} δ={c.delta:g} q={c.sample_rate:g}"
    clients = ", ".join(f"{name} {tr}/{ho}" for name, (tr, ho) in sizes.items())
    print(f"fedtune: {cfg.federation.mode}, {cfg.federation.rounds} round(s), {cfg.model.name}, {dp}", file=sys.stderr)
    print(f"fedtune: train/held-out records: {clients}", file=sys.stderr)
    line = announce_choice(cfg, sizes)
    if line:
        print(f"fedtune: {line}", file=sys.stderr)


def _print_result(run_dir: Path) -> None:
    import json

    s = json.loads((run_dir / "summary.json").read_text())
    print(f"run folder: {run_dir}")
    if headline(s):
        print(headline(s))
    for c in s.get("clients", []):
        eps = c.get("epsilon")
        eps_text = "no DP" if eps is None or eps == float("inf") else f"ε={eps:.2f}"
        if not c.get("rounds_trained"):  # "no DP" never stands for "did not train"
            eps_text = "did not train" + (f" (ε={eps:.2f})" if eps is not None and eps != float("inf") else "")
        print(f"  {c['client']}: {eps_text}, rounds trained {c.get('rounds_trained', 0)}, refusals {c.get('refusals', 0)}"
              + (f", failures {c['failures']}" if c.get("failures") else ""))
    cl = s.get("client_level")
    if cl:
        print(f"  client-level (each client's whole data): ε={cl['epsilon']:.2f} at δ={cl['delta']:g} over {cl['rounds']} round(s)")
    pers = s.get("personalization")
    if pers:
        avg = pers["average"]
        print(f"personalization ({pers['method']}): mean client perplexity global {avg['global']:.2f} -> "
              f"personalized {avg['personalized']:.2f} (local-only {avg['local']:.2f}); {run_dir / 'personalization.md'}")
    print(f"report: {run_dir / 'summary.md'}")


def cmd_audit(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from fedtune.privacy.audit import SHORT_UNIT, run_audit  # lazy: flwr, numpy (the server's receipts)

    result = run_audit(args.run_dir, verify=args.verify, empirical=args.empirical)
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # logs and pipes: keep the table readable
    table = Table(title=f"Privacy audit: {args.run_dir}")
    for col in ("ledger", "unit", "ε spent", "δ", "budget", "remaining", "rounds", "steps", "q", "σ", "C", "accountant"):
        table.add_column(col, justify="left" if col in ("ledger", "unit", "accountant") else "right")
    fmt = lambda x: "∞" if x == float("inf") else f"{x:.3g}"  # noqa: E731
    for r in result["rows"]:
        table.add_row(r["client"], SHORT_UNIT.get(r["level"], r["level"]),
                      fmt(r["epsilon"]) if r["dp"] else "∞ (no DP)", f"{r['delta']:g}", fmt(r["budget"]),
                      fmt(r["remaining"]), str(r["rounds_joined"]), str(r["steps"]), f"{r['sample_rate']:.4g}",
                      f"{r['noise_multiplier']:.4g}", f"{r['clip_norm']:g}", r["accountant"].upper())
    console.print(table)
    for level, unit in {r["level"]: r["unit"] for r in result["rows"]}.items():
        console.print(f"{level}-level unit: {unit}")
    for r in result["refusals"]:  # one unwrapped line each
        print(f"refused: {r['client']} declined round {r['round']} ({r['reason']}; recorded by "
              f"{' and '.join(r['recorded_by'])})", flush=True)
    uncovered = sorted({f"{r['phase']}:{r['metric']}" for r in result.get("revealed", []) if not r["data_independent"]})
    if uncovered:  # losses (privacy.reveal_losses), and without secagg the count N
        print(f"revealed in the clear, outside the DP guarantee: {', '.join(uncovered)}", flush=True)
    failed = False
    emp = result.get("empirical") or {}
    if "one_run" in emp:
        o = emp["one_run"]
        console.print(f"empirical: ε̂ = {o['epsilon_lower_bound']:.3f} (95% lower bound, {o['canaries']} canaries, "
                      f"AUROC {o['auroc']:.3f}) vs accountant ε = {fmt(emp['accountant_epsilon'])}"
                      + ("  [bold red]VIOLATION: ε̂ > ε means a DP bug[/]" if o["violation"] else "  (ε̂ ≤ ε, as expected)"))
        failed |= o["violation"]
    for sec in emp.get("secrets", []):
        console.print(f"secret {sec['id']} (client-{sec['client']}, {sec['repeats']} copies): exposure "
                      f"{sec['exposure_bits']:.2f} of {sec['max_exposure_bits']:.2f} bits (rank {sec['rank']})")
    if args.verify:
        if result["problems"]:
            failed = True
            console.print("[bold red]verification FAILED[/]")
            for problem in result["problems"]:
                print(problem)
        else:
            console.print("verification passed: every ε recomputed with dp-accounting, hash chains intact, "
                          "ledger heads match the server's receipts, every received update has its spend")
    console.print(f"report: {Path(args.run_dir) / 'audit.md'}")
    return 1 if failed else 0


def cmd_data(args) -> int:
    from fedtune.data import export_clients  # lazy: torch

    overrides = dict(parse_assignment(item) for item in args.set)
    if args.clients is not None:
        overrides["federation.clients"] = args.clients
    if args.data is not None:
        overrides["data.source"] = args.data
    cfg = config_mod.load(args.config, overrides)
    names = [n.strip() for n in args.names.split(",")] if args.names else None
    for path in export_clients(cfg, args.out, names):
        print(path)
    return 0


def cmd_personalize(args) -> int:
    from fedtune.personalize import MD, personalize  # lazy: torch, flwr

    overrides = dict(parse_assignment(item) for item in args.set)
    if args.method:
        overrides["personalize.method"] = args.method
    if args.steps is not None:
        overrides["personalize.steps"] = args.steps
    if args.no_dp:
        overrides["personalize.dp"] = False
    result = personalize(args.run_dir, overrides,
                         progress=lambda i, n: print(f"fedtune: personalizing client {i + 1}/{n}", file=sys.stderr))
    for label in ("average", "worst"):
        r = result[label]
        print(f"{label} client perplexity: base {r['base']:.2f}, local-only {r['local']:.2f}, "
              f"global {r['global']:.2f}, personalized {r['personalized']:.2f}")
    print(f"report: {Path(args.run_dir) / MD}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedtune", description="Federated, differentially private LoRA fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True)
    _simulate_parser(sub)
    _audit_parser(sub)
    _personalize_parser(sub)
    _data_parser(sub)
    add_parsers(sub)
    add_export_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        commands = {"simulate": cmd_simulate, "audit": cmd_audit, "personalize": cmd_personalize, "data": cmd_data,
                    **COMMANDS, **EXPORT_COMMANDS}
        return commands[args.command](args)
    except FedtuneError as exc:
        print(f"fedtune: error: {exc}", file=sys.stderr)
        return 2
    except RunFailed as exc:
        print(f"fedtune: run failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fedtune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
