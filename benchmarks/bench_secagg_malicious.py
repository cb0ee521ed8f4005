"""Added cost of SecAgg+ secure against a malicious server over the honest-but-curious
variant, measured side by side in one process: per client (time, upload, download) and for
the server, per adapter size and client count.

Both variants run fedtune.secagg's state machines in memory with the same inputs, degree and
encoding, no dropouts. The malicious one adds what fedtune's Flower rounds do (flower_server,
flower_client): the identify and graph stages (identity key, the graph seed's commit-reveal
coin toss, coin.check_setup), identity signatures on the advertised keys and the input
declaration, the neighbours' key signatures checked at share, the consistency stage (its own
and its surviving neighbours' declarations checked, the statement signed) and the quorum of
survivor signatures checked before unmask. Identity keys are Ed25519; in deployment (the default;
--identity simulation leaves it out) each is certified at identify by the client's P-384
SuperNode key (once per run: the client keeps it) and the server checks the certificates
every round. Loading key files and making the certificate are not timed.

Bytes are payload bytes as in bench_secagg.py (byte strings at their length, numbers at 8).
Times are CPU seconds of this (single-threaded) process, not wall-clock: on a shared machine
wall-clock time measures the other jobs. The two variants' rounds run in lockstep (drive): each
client's answer to a stage in one runs right next to the same answer in the other, so the
machine's load hits both alike. Each run's added time is the median client's malicious minus
honest time; --repeat runs at least (more, up to 40, until the case took --min-cpu-s: a
1M-parameter round is ~35 ms a client); the median over runs is reported with its spread, and a
cross-check from each client's fastest run. One more malicious run (1,000 values) counts and
times each client's signatures, signature checks, tags and tag checks.

    nice -n 10 python benchmarks/bench_secagg_malicious.py --out benchmarks/results
    python benchmarks/bench_secagg_malicious.py --params 0.1M --clients 10 --out /tmp/x   # seconds
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections import Counter, namedtuple
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_secagg import SECAGG, payload_bytes, size_arg, size_label  # noqa: E402
from secagg_malicious_report import markdown  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402

from fedtune.secagg import FixedPoint, SecAggClient, SecAggParams, SecAggServer, WeightedFixedPoint  # noqa: E402
from fedtune.secagg import coin, crypto, identity  # noqa: E402

pc = time.process_time  # CPU seconds of this process: on a shared machine, wall-clock measures the other jobs


COUNTED = {"signatures": (identity, "sign"), "signature checks": (identity, "verify_statement"),
           "tags": (crypto, "tag"), "tag checks": (crypto, "tagged")}
MAX_REPEAT = 40
STAGES = ("identify", "graph", "advertise", "share", "collect", "consistency", "unmask")


@contextlib.contextmanager
def counting(meter: Meter):
    """Counts, per client, the calls of the COUNTED primitives made while it answers a stage, and
    their CPU time (under "cpu <name>")."""
    saved = {name: getattr(mod, attr) for name, (mod, attr) in COUNTED.items()}

    def counted(name, fn):
        def call(*a, **k):
            if meter.current is None:
                return fn(*a, **k)
            t = pc()
            out = fn(*a, **k)
            meter.counts[meter.current]["cpu " + name] += pc() - t
            meter.counts[meter.current][name] += 1
            return out
        return call

    for name, (mod, attr) in COUNTED.items():
        setattr(mod, attr, counted(name, saved[name]))
    try:
        yield
    finally:
        for name, (mod, attr) in COUNTED.items():
            setattr(mod, attr, saved[name])


class Meter:
    """Per-client seconds (in all and by stage), upload and download bytes, and server seconds."""

    def __init__(self, ids):
        self.client = dict.fromkeys(ids, 0.0)
        self.stage = {s: dict.fromkeys(ids, 0.0) for s in STAGES}
        self.up = dict.fromkeys(ids, 0)
        self.down = dict.fromkeys(ids, 0)
        self.server = 0.0
        self.counts = {c: Counter() for c in ids}
        self.current: int | None = None  # the client answering now (for counting)

    def serve(self, fn, *a):
        t = pc()
        out = fn(*a)
        self.server += pc() - t
        return out

    def ask(self, stage: str, requests: dict[int, Any], fn) -> Iterator[Call]:
        """Each client's reply to its request in ``stage`` (a generator: it yields each client's
        call for the driver to run, in lockstep with the other variant's, and returns the replies)."""
        replies = {}
        for c, req in requests.items():
            self.down[c] += payload_bytes(req)
            replies[c] = yield Call(self, stage, c, functools.partial(fn, c, req))
            self.up[c] += payload_bytes(replies[c])
        return replies

    def call(self, stage: str, c: int, thunk) -> Any:
        """Runs one client's answer, timed (and counted)."""
        self.current, t = c, pc()
        out = thunk()
        dt, self.current = pc() - t, None
        self.client[c] += dt
        self.stage[stage][c] += dt
        return out


Call = namedtuple("Call", "meter stage client thunk")  # one client's answer to one stage, waiting to be run


def drive(rounds: list[Generator]) -> list[dict[str, Any]]:
    """Runs the variants' rounds in lockstep: at every step, each round waiting at the earliest
    stage answers one client call, in the order given, so the same client's same stage in the two
    variants runs back to back (milliseconds apart) and the machine's load hits both alike."""
    calls: dict[int, Any] = {i: next(g) for i, g in enumerate(rounds)}
    results: dict[int, Any] = {}
    while calls:
        first = min(STAGES.index(c.stage) for c in calls.values())
        for i in [i for i, c in calls.items() if STAGES.index(c.stage) == first]:
            call = calls.pop(i)
            try:
                calls[i] = rounds[i].send(call.meter.call(call.stage, call.client, call.thunk))
            except StopIteration as done:
                results[i] = done.value
    return [results[i] for i in range(len(rounds))]


def _identity_keys(ids):
    """Each client's Ed25519 identity key and, in deployment, its P-384 registered key."""
    return {c: identity.generate() for c in ids}, {c: ec.generate_private_key(ec.SECP384R1()) for c in ids}


def _coin_toss(ids, keys, registered, meter: Meter, deployment: bool) -> Generator:
    """identify (with the certificate in deployment) and graph, as flower_server/flower_client
    run them: setup extras, graph seed."""
    server_seed = os.urandom(32)
    commit = meter.serve(coin.commit, server_seed)
    nonces: dict[int, bytes] = {}
    reg_pub = {c: identity.public_bytes(k) for c, k in registered.items()}  # the server's keys folder
    certs = {c: identity.sign(registered[c], identity.CERTIFY, b"", identity.public_bytes(keys[c]))
             for c in ids} if deployment else {}  # once per run (roster.certificate keeps it): not timed

    def identify(c, req):
        nonces[c] = os.urandom(coin.NONCE_BYTES)
        public = identity.public_bytes(keys[c])
        reply = {"name": f"client-{c}", "identity": public, "registered": int(deployment),
                 "nonce_commit": coin.commit(nonces[c])}
        if deployment:
            reply["cert"] = certs[c]
        return reply

    replies = yield from meter.ask("identify", {c: {"graph_commit": commit} for c in ids}, identify)
    if deployment:  # admission: each certificate checked against the registered key
        for c, r in replies.items():
            assert meter.serve(identity.verify, reg_pub[c], r["cert"], identity.CERTIFY, b"", r["identity"])
    commits = {c: r["nonce_commit"] for c, r in replies.items()}
    shown = meter.serve(coin.digest, commits)
    revealed = yield from meter.ask("graph", {c: {"commits_digest": shown} for c in ids}, lambda c, req: {"nonce": nonces[c]})
    graph_seed = meter.serve(coin.draw, server_seed, {c: r["nonce"] for c, r in revealed.items()})
    extra = {"server_seed": server_seed, "nonces": {c: r["nonce"] for c, r in revealed.items()}}
    return {"extra": extra, "commit": commit, "shown": shown, "nonces": nonces}, graph_seed


def run_variants(d: int, n: int, order: tuple[bool, ...], args, inputs, weights, count: bool = False) -> list[dict]:
    """One round of each variant in ``order`` (malicious or not), run in lockstep."""
    meters = [Meter(list(range(1, n + 1))) for _ in order]
    with counting(meters[-1]) if count else contextlib.nullcontext():
        return drive([_run_variant(meter, d, n, m, args, inputs, weights) for meter, m in zip(meters, order)])


def _run_variant(meter: Meter, d: int, n: int, malicious: bool, args, inputs, weights) -> Generator:
    ids = list(meter.client)
    enc = WeightedFixedPoint(FixedPoint(clip=args.clip, bits=args.bits, n_max=n), max_weight=float(args.max_weight))
    params = SecAggParams(field_bits=enc.field_bits, length=enc.length(d), degree=args.degree, min_inputs=2)
    keys, toss, seed = {}, None, None
    if malicious:
        keys, registered = _identity_keys(ids)
        toss, seed = yield from _coin_toss(ids, keys, registered, meter, args.identity == "deployment")
    roster = {c: identity.public_bytes(keys[c]) for c in ids} if malicious else {}
    server = meter.serve(lambda: SecAggServer(params, ids, graph_seed=seed, roster=roster))
    setup = meter.serve(server.advertise_request)
    clients: dict[int, SecAggClient] = {}

    def advertise(c, req):
        if malicious:
            coin.check_setup(c, {**req, **toss["extra"]}, toss["commit"], toss["shown"], toss["nonces"][c])
        clients[c] = SecAggClient(c, req, keys.get(c))
        return clients[c].advertise_keys()

    requests = {c: {**setup, **(toss["extra"] if malicious else {})} for c in ids}
    meter.serve(server.receive_advertise, (yield from meter.ask("advertise", requests, advertise)))
    meter.serve(server.receive_share, (yield from meter.ask("share", meter.serve(server.share_requests),
                                                            lambda c, r: clients[c].share_keys(r))))

    def collect(c, req):
        clients[c].receive_shares(req)
        return clients[c].masked_input(enc.encode(inputs[c], weights[c], seed=c.to_bytes(32, "big")))

    meter.serve(server.receive_collect, (yield from meter.ask("collect", meter.serve(server.collect_requests), collect)))
    if malicious:
        meter.serve(server.receive_consistency, (yield from meter.ask(
            "consistency", meter.serve(server.consistency_requests), lambda c, r: clients[c].consistency(r))))
    result = meter.serve(server.receive_unmask, (yield from meter.ask(
        "unmask", meter.serve(server.unmask_requests), lambda c, r: clients[c].unmask(r))))
    avg, _ = meter.serve(enc.decode, result.total, n)
    return {"client_s": meter.client, "stage_s": meter.stage, "up": meter.up, "down": meter.down,
            "server_s": meter.server, "avg": avg / sum(weights.values()), "counts": meter.counts}


def run_case(d: int, n: int, args, order: int) -> dict[str, Any]:
    rng = np.random.default_rng(d + n)
    inputs = {c: (rng.standard_normal(d, dtype=np.float32) * np.float32(args.scale)) for c in range(1, n + 1)}
    weights = {c: float(rng.integers(1, args.max_weight + 1)) for c in inputs}
    runs: list[tuple[dict[str, Any], dict[str, Any]]] = []  # (honest, malicious), each run in lockstep
    t0 = pc()
    while len(runs) < args.repeat or (pc() - t0 < args.min_cpu_s and len(runs) < MAX_REPEAT):  # cheap cases: more
        variants = (False, True) if (order + len(runs)) % 2 == 0 else (True, False)  # who answers first, alternating
        h, m = (dict(zip(variants, run_variants(d, n, variants, args, inputs, weights)))[v] for v in (False, True))
        assert np.array_equal(h.pop("avg"), m.pop("avg")), "the two variants must give the same sum"
        runs.append((h, m))  # without the sums: no run's arrays stay behind
        gc.collect()  # between runs, untimed: neither variant pays for the other's (or an earlier run's) garbage
    small = {c: x[:1000] for c, x in inputs.items()}  # what a client signs and checks does not depend on d
    counts = run_variants(1000, n, (True,), args, small, weights, count=True)[0]["counts"]
    h, m = runs[-1]  # bytes: the same every run
    return {
        **client_times(runs, list(inputs)),
        "primitives_per_client": {k: med(counts[c][k] for c in inputs) for k in COUNTED},
        "primitives_s_per_client": {k: med(counts[c]["cpu " + k] for c in inputs) for k in COUNTED},
        "params": d, "clients": n, "fp32_bytes": 4 * d, "runs_each": len(runs),
        "server_s": {"honest": min(h["server_s"] for h, _ in runs), "malicious": min(m["server_s"] for _, m in runs)},
        "upload_bytes": {"honest": med(h["up"].values()), "malicious": med(m["up"].values())},
        "download_bytes": {"honest": med(h["down"].values()), "malicious": med(m["down"].values())},
        "upload_ratio_fp32": max(m["up"].values()) / (4 * d),
        "extra_bytes_per_client": {"upload": max(m["up"][c] - h["up"][c] for c in inputs),
                                   "download": max(m["down"][c] - h["down"][c] for c in inputs)},
    }


def med(xs) -> float:
    return float(statistics.median(xs))


def client_times(runs: list[tuple[dict, dict]], ids: list[int]) -> dict[str, Any]:
    """The median client's added time. Headline (paired): in each run, the median over clients of
    each client's malicious minus honest time (its two answers ran back to back), then the median
    over runs, with its spread across runs. Cross-check (fastest): each client's fastest run of
    each variant, the median client's difference."""
    paired = [med(m["client_s"][c] - h["client_s"][c] for c in ids) for h, m in runs]
    honest = med(med(h["client_s"].values()) for h, _ in runs)
    fastest = {v: {c: min(run[i]["client_s"][c] for run in runs) for c in ids} for i, v in enumerate(("h", "m"))}
    q = statistics.quantiles(paired, n=4) if len(paired) > 1 else [paired[0]] * 3
    return {
        "client_s": {"honest": honest, "malicious": med(med(m["client_s"].values()) for _, m in runs),
                     "added_median": med(paired), "added_quartiles": [q[0], q[2]],
                     "added_range": [min(paired), max(paired)], "added_per_run": paired,
                     "fastest_honest": med(fastest["h"].values()), "fastest_malicious": med(fastest["m"].values()),
                     "fastest_added": med(fastest["m"][c] - fastest["h"][c] for c in ids)},
        "client_added_pct": 100 * med(paired) / honest,
        "added_by_stage_s": {s: med(med(m["stage_s"][s][c] - h["stage_s"][s][c] for c in ids) for h, m in runs)
                             for s in STAGES},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", nargs="+", type=size_arg, default=[1_000_000, 10_000_000])
    ap.add_argument("--clients", nargs="+", type=int, default=[10, 50])
    ap.add_argument("--degree", type=int, default=SECAGG.degree)
    ap.add_argument("--bits", type=int, default=SECAGG.bits)
    ap.add_argument("--clip", type=float, default=SECAGG.clip)
    ap.add_argument("--max-weight", type=int, default=int(SECAGG.max_weight))
    ap.add_argument("--scale", type=float, default=1e-3)
    ap.add_argument("--identity", choices=["deployment", "simulation"], default="deployment")
    ap.add_argument("--repeat", type=int, default=5, help="runs of each variant at least; each client's fastest counts")
    ap.add_argument("--min-cpu-s", type=float, default=60.0,
                    help=f"and more (up to {MAX_REPEAT}) until a case has taken this much CPU time")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--merge", nargs="+", type=Path, help="write --out from these result files' cases (runs made "
                    "side by side, e.g. one per size) instead of measuring")
    args = ap.parse_args()
    if args.merge:
        return merge(args.merge, args.out)
    t0, cases = pc(), []
    for i, (d, n) in enumerate((d, n) for d in args.params for n in args.clients):
        print(f"{size_label(d)} x {n} clients ...", flush=True)
        cases.append(run_case(d, n, args, i))
        c = cases[-1]
        print(f"  client +{c['client_s']['added_median']:.3f} s ({c['client_added_pct']:.1f}%), upload ratio "
              f"{c['upload_ratio_fp32']:.3f}, extra {c['extra_bytes_per_client']}", flush=True)
        write(args, cases, t0)  # after every case: a run stopped early keeps what it measured


def merge(files: list[Path], out: Path) -> None:
    parts = [json.loads(f.read_text()) for f in files]
    result = {**parts[0], "cases": [c for p in parts for c in p["cases"]],
              "load": "; ".join(p["load"] for p in parts), "note": f"{len(parts)} processes side by side: " + "; ".join(p["note"] for p in parts)}
    result["args"]["params"] = [p for part in parts for p in part["args"]["params"]]
    (out / "secagg_malicious.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "secagg_malicious.md").write_text(markdown(result))


def write(args, cases: list[dict[str, Any]], t0: float) -> None:
    load = os.getloadavg()
    result = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
                   f"numpy {np.__version__}",
        "load": f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min) when written, niceness "
                f"{os.nice(0)}",
        "note": f"one run, {pc() - t0:.0f} s so far, {len(cases)} of {len(args.params) * len(args.clients)} cases; "
                "CPU times on a shared machine",
        "cases": cases,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "secagg_malicious.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "secagg_malicious.md").write_text(markdown(result))


if __name__ == "__main__":
    main()
