"""Cost of secure aggregation (SecAgg+, fedtune.secagg) against plain aggregation: upload
bytes, client time and server time of one round, per adapter size and client count.

Each client holds a float32 update of D values drawn from normal(0, --scale) and an
example count (its weight, 1..--max-weight). Plain: the client uploads the fp32 bytes and
the server takes the weighted average in numpy. Secure: the clients and server run all
four SecAgg+ stages in memory (advertise, share, collect, unmask; no dropouts), with
WeightedFixedPoint encoding (--bits of precision over [-clip, clip], a field just large
enough for the sum of n clients, n_max = n), the masked vector packed at m bits a value.
The decoded secure average must match the plain one within the fixed-point error bound,
or the benchmark stops. Every client is timed; the table shows the median client.

--bits, --clip and --max-weight default to fedtune's [secagg] defaults (24 bits over
[-0.25, 0.25], weights up to 1000 examples): values outside [-clip, clip] are clipped, and
updates of scale 1e-3 never reach 0.25.

Bytes are payload bytes: byte strings at their length, client ids and other numbers at 8
bytes; field names and transport framing are left out. MB = 10^6 bytes.

    python benchmarks/bench_secagg.py                           # 0.1M, 1M, 10M x 4, 10, 50 clients
    python benchmarks/bench_secagg.py --params 1M --clients 10 50 --out /tmp/x
    python benchmarks/bench_secagg.py --quick --out /tmp/secagg-bench   # smoke test, seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedtune.config import SecAggSection  # noqa: E402
from fedtune.secagg import (  # noqa: E402
    FixedPoint, SecAggClient, SecAggParams, SecAggServer, WeightedFixedPoint,
)

DEFAULT_PARAMS = (100_000, 1_000_000, 10_000_000)
DEFAULT_CLIENTS = (4, 10, 50)
QUICK_PARAMS = (100_000,)
QUICK_CLIENTS = (4, 10)
CLIENT_STAGES = ("advertise", "share", "encode", "receive_shares", "mask_pack", "unmask")
SERVER_STAGES = ("advertise", "share", "collect", "unmask", "decode")
TARGET_RATIO = 1.1  # masked vector bytes / fp32 bytes

pc = time.perf_counter

SECAGG = SecAggSection()  # fedtune's defaults


def size_arg(text: str) -> int:
    """100000, 100k, 0.1M, 1e6 -> an integer count."""
    t = text.strip().lower()
    mult = {"k": 1_000, "m": 1_000_000}.get(t[-1:], 1)
    value = float(t[:-1] if mult > 1 else t) * mult
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"not a positive whole number of parameters: {text}")
    return int(value)


def size_label(d: int) -> str:
    return f"{d / 1e6:g}M"


def payload_bytes(obj: Any) -> int:
    """Payload of a message: bytes at their length, numbers (client ids included) at 8."""
    if isinstance(obj, bytes | bytearray):
        return len(obj)
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, Mapping):
        return sum(payload_bytes(v) + (0 if isinstance(k, str) else 8) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        return sum(payload_bytes(v) for v in obj)
    if isinstance(obj, int | float | np.integer | np.floating):
        return 8
    return 0


def rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def median(xs) -> float:
    return float(statistics.median(xs))


def run_case(d: int, n: int, args: argparse.Namespace, rng: np.random.Generator) -> dict[str, Any]:
    case_t0 = pc()
    ids = list(range(1, n + 1))
    enc = WeightedFixedPoint(FixedPoint(clip=args.clip, bits=args.bits, n_max=n), max_weight=float(args.max_weight))
    weights = {c: float(rng.integers(1, args.max_weight + 1)) for c in ids}
    total_weight = sum(weights.values())

    # -- plain: each client serializes its fp32 vector, the server averages ------------------
    uploads: dict[int, bytes] = {}
    plain_client = []
    max_abs = 0.0
    for c in ids:
        x = rng.standard_normal(d, dtype=np.float32)
        x *= np.float32(args.scale)
        max_abs = max(max_abs, float(np.abs(x).max()))
        t = pc()
        uploads[c] = x.tobytes()
        plain_client.append(pc() - t)
        del x
    t = pc()
    acc = np.zeros(d, dtype=np.float64)
    for c in ids:
        acc += np.float64(weights[c]) * np.frombuffer(uploads[c], dtype=np.float32)
    plain_avg = acc / total_weight
    plain_server = pc() - t
    del acc
    if max_abs > args.clip:  # the encoding clips: compare against the clipped plain sum
        ref_sum = np.zeros(d, dtype=np.float64)
        for c in ids:
            ref_sum += weights[c] * np.clip(np.frombuffer(uploads[c], dtype=np.float32), -args.clip, args.clip)
    else:
        ref_sum = plain_avg * total_weight

    # -- secure: all four stages, every client timed ------------------------------------------
    srv_t = dict.fromkeys(SERVER_STAGES, 0.0)
    cl_t: dict[int, dict[str, float]] = {c: {} for c in ids}
    up_b: dict[int, dict[str, int]] = {c: {} for c in ids}
    down_b: dict[int, int] = dict.fromkeys(ids, 0)

    t = pc()
    params = SecAggParams(field_bits=enc.field_bits, length=enc.length(d), degree=args.degree)
    server = SecAggServer(params, ids)
    setup = server.advertise_request()
    srv_t["advertise"] += pc() - t
    clients: dict[int, SecAggClient] = {}
    replies: dict[int, Any] = {}
    for c in ids:
        down_b[c] += payload_bytes(setup)
        t = pc()
        clients[c] = SecAggClient(c, setup)  # makes the two key pairs and the self-mask seed
        replies[c] = clients[c].advertise_keys()
        cl_t[c]["advertise"] = pc() - t
        up_b[c]["advertise"] = payload_bytes(replies[c])
    t = pc()
    server.receive_advertise(replies)
    t1 = pc()
    requests = server.share_requests()
    srv_t["advertise"] += t1 - t
    srv_t["share"] += pc() - t1

    replies = {}
    for c in ids:
        down_b[c] += payload_bytes(requests[c])
        t = pc()
        replies[c] = clients[c].share_keys(requests[c])
        cl_t[c]["share"] = pc() - t
        up_b[c]["share"] = payload_bytes(replies[c])
    t = pc()
    server.receive_share(replies)
    t1 = pc()
    requests = server.collect_requests()
    srv_t["share"] += t1 - t
    srv_t["collect"] += pc() - t1

    replies = {}
    for c in ids:
        down_b[c] += payload_bytes(requests[c])
        x = np.frombuffer(uploads.pop(c), dtype=np.float32)  # the fp32 copy goes once encoded
        t0 = pc()
        v = enc.encode(x, weights[c])
        t1 = pc()
        clients[c].receive_shares(requests[c])
        t2 = pc()
        replies[c] = clients[c].masked_input(v)
        t3 = pc()
        del x, v
        cl_t[c].update(encode=t1 - t0, receive_shares=t2 - t1, mask_pack=t3 - t2)
        up_b[c]["masked"] = len(replies[c]["masked"])
    del uploads
    gc.collect()
    t = pc()
    server.receive_collect(replies)  # unpacks every masked vector
    t1 = pc()
    del replies
    t2 = pc()
    requests = server.unmask_requests()
    srv_t["collect"] += t1 - t
    srv_t["unmask"] += pc() - t2

    replies = {}
    for c in ids:
        down_b[c] += payload_bytes(requests[c])
        t = pc()
        replies[c] = clients[c].unmask(requests[c])
        cl_t[c]["unmask"] = pc() - t
        up_b[c]["unmask"] = payload_bytes(replies[c])
    t = pc()
    result = server.receive_unmask(replies)
    srv_t["unmask"] += pc() - t
    t = pc()
    weighted, secure_weight = enc.decode(result.total, len(result.clients))
    secure_avg = weighted / secure_weight
    srv_t["decode"] += pc() - t
    del server, clients, replies, result
    gc.collect()

    # -- correctness: the secure average is the plain one within the fixed-point bound -------
    bound_x, bound_w = enc.error_bound(n)
    ref_avg = ref_sum / total_weight
    err_sum = float(np.abs(weighted - ref_sum).max())
    err_w = abs(secure_weight - total_weight)
    bound_avg = (bound_x + float(np.abs(ref_avg).max()) * bound_w) / secure_weight
    err_avg = float(np.abs(secure_avg - ref_avg).max())
    rel_rms = float(np.sqrt(np.mean((secure_avg - ref_avg) ** 2)) / max(np.sqrt(np.mean(ref_avg ** 2)), 1e-300))
    if not (err_sum < bound_x and err_w < bound_w and err_avg <= bound_avg):
        sys.exit(f"bench_secagg: WRONG secure aggregate for {size_label(d)} x {n} clients: weighted-sum error "
                 f"{err_sum:.3g} (bound {bound_x:.3g}), weight error {err_w:.3g} (bound {bound_w:.3g}), "
                 f"average error {err_avg:.3g} (bound {bound_avg:.3g})")
    del weighted, secure_avg, ref_avg, ref_sum, plain_avg
    gc.collect()

    masked = [up_b[c]["masked"] for c in ids]
    keys = [up_b[c]["advertise"] + up_b[c]["share"] + up_b[c]["unmask"] for c in ids]
    totals = [sum(cl_t[c].values()) for c in ids]
    plain_bytes = 4 * d
    secure_client = median(totals)
    secure_server = sum(srv_t.values())
    return {
        "params": d, "clients": n, "field_bits": enc.field_bits, "degree": params.degree_for(n),
        "threshold": params.threshold_for(n),
        "upload_bytes": {
            "plain": plain_bytes, "secure_masked": median(masked),
            "secure_keys": median(keys),
            "secure_keys_by_stage": {s: median(up_b[c][s] for c in ids) for s in ("advertise", "share", "unmask")},
            "secure_total": median(m + k for m, k in zip(masked, keys, strict=True)),
            "ratio_masked": median(masked) / plain_bytes,
            "ratio_total": median(m + k for m, k in zip(masked, keys, strict=True)) / plain_bytes,
            "within_target": max(masked) <= TARGET_RATIO * plain_bytes,
        },
        "download_key_bytes_secure": median(down_b.values()),
        "client_s": {
            "plain": median(plain_client), "secure": secure_client,
            "secure_by_stage": {s: median(cl_t[c][s] for c in ids) for s in CLIENT_STAGES},
            "secure_min": min(totals), "secure_max": max(totals),
        },
        "server_s": {"plain": plain_server, "secure": secure_server, "secure_by_stage": srv_t},
        "check": {
            "max_abs_value": max_abs, "clipped": max_abs > args.clip,
            "weighted_sum_err": err_sum, "weighted_sum_bound": bound_x,
            "weight_err": err_w, "weight_bound": bound_w,
            "average_err": err_avg, "average_bound": bound_avg, "average_rel_rms_err": rel_rms, "ok": True,
        },
        "wall_s": pc() - case_t0, "peak_rss_mb_so_far": rss_peak_mb(),
    }


def markdown(result: dict[str, Any]) -> str:
    a = result["args"]
    out = [
        "# Secure aggregation (SecAgg+) vs plain aggregation, one round\n",
        f"Float32 updates ~ normal(0, {a['scale']:g}), weights 1..{a['max_weight']}; SecAgg+ with {a['bits']}-bit "
        f"weighted fixed point over [-{a['clip']:g}, {a['clip']:g}], field of m = bits + ceil(log2 n) bits, "
        f"neighbour degree {a['degree']}, no dropouts. {result['machine']}; one run on a shared, noisy machine "
        f"(total {result['wall_s']:.0f} s, peak RSS {result['peak_rss_mb']:.0f} MB).\n",
        "Upload per client in MB (10^6 bytes). Secure = packed masked vector + key/share messages "
        "(advertise, share, unmask replies). Ratio = secure total / plain (the masked vector alone is "
        f"m/32 of fp32; target ≤ {TARGET_RATIO}). Client s = median client (plain: fp32 serialization; secure: "
        "advertise + share + encode + decrypt shares + mask + pack + unmask). Server s = plain weighted average "
        "vs all server stages incl. unpacking, unmasking and decoding. Every secure average was checked "
        "against the plain one within the fixed-point error bound.\n",
    ]
    for d in sorted({c["params"] for c in result["cases"]}):
        out.append(f"\n## {size_label(d)} parameters ({4 * d / 1e6:g} MB fp32)\n\n"
                   "| clients | m bits | upload plain MB | secure MB (masked + keys) | ratio | client s plain / secure "
                   "| server s plain / secure |\n|---|---|---|---|---|---|---|")
        for c in (c for c in result["cases"] if c["params"] == d):
            u, cl, sv = c["upload_bytes"], c["client_s"], c["server_s"]
            out.append(
                f"| {c['clients']} | {c['field_bits']} | {u['plain'] / 1e6:.3f} | {u['secure_total'] / 1e6:.3f} "
                f"({u['secure_masked'] / 1e6:.3f} + {u['secure_keys'] / 1e6:.4f}) | **{u['ratio_total']:.3f}** | "
                f"{cl['plain']:.4f} / {cl['secure']:.3f} | {sv['plain']:.4f} / {sv['secure']:.3f} |")
        errs = ", ".join(f"{c['clients']} clients {100 * c['check']['average_rel_rms_err']:.2f}%" for c in result["cases"]
                         if c["params"] == d)
        out.append(f"\nFixed-point error of the secure average (relative RMS vs plain): {errs}.")
    out.append("\nPer-stage times (median client; server) are in secagg.json.\n")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--params", nargs="+", type=size_arg, default=None,
                    help="adapter sizes (100k, 0.1M, 1e6, ...); default 0.1M 1M 10M")
    ap.add_argument("--clients", nargs="+", type=int, default=None, help="client counts; default 4 10 50")
    ap.add_argument("--bits", type=int, default=SECAGG.bits, help=f"fixed-point bits per value (default {SECAGG.bits})")
    ap.add_argument("--degree", type=int, default=SECAGG.degree, help=f"SecAgg+ neighbours per client (default {SECAGG.degree})")
    ap.add_argument("--clip", type=float, default=SECAGG.clip, help=f"encoding range [-clip, clip] (default {SECAGG.clip})")
    ap.add_argument("--scale", type=float, default=1e-3, help="std of the update values (default 1e-3)")
    ap.add_argument("--max-weight", type=int, default=int(SECAGG.max_weight),
                    help=f"weights are drawn from 1..this (default {SECAGG.max_weight:g})")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic updates (masks use os.urandom)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 0.1M params, 4 and 10 clients")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    params = args.params or (QUICK_PARAMS if args.quick else DEFAULT_PARAMS)
    clients = args.clients or (QUICK_CLIENTS if args.quick else DEFAULT_CLIENTS)
    if min(clients) < 2:
        ap.error("secure aggregation needs at least 2 clients")

    run_case(1000, 3, args, np.random.default_rng(0))  # warm-up (imports, allocator), not reported
    rng = np.random.default_rng(args.seed)
    t0 = pc()
    cases = []
    for d in params:
        for n in clients:
            print(f"bench_secagg: {size_label(d)} params x {n} clients ...", file=sys.stderr, flush=True)
            cases.append(run_case(d, n, args, rng))
            c = cases[-1]
            print(f"  upload ratio {c['upload_bytes']['ratio_total']:.3f}, client {c['client_s']['secure']:.3f} s, "
                  f"server {c['server_s']['secure']:.3f} s (plain {c['server_s']['plain']:.4f} s), "
                  f"{c['wall_s']:.1f} s wall", file=sys.stderr, flush=True)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
                   f"numpy {np.__version__}",
        "platform": platform.platform(), "cores": os.cpu_count(), "python": platform.python_version(),
        "note": "one run, wall-clock times on a shared and noisy machine",
        "args": {"params": list(params), "clients": list(clients), "bits": args.bits, "degree": args.degree,
                 "clip": args.clip, "scale": args.scale, "max_weight": args.max_weight, "seed": args.seed,
                 "quick": args.quick},
        "target_masked_ratio": TARGET_RATIO, "wall_s": pc() - t0, "peak_rss_mb": rss_peak_mb(), "cases": cases,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "secagg.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "secagg.md").write_text(markdown(result))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
