"""The deployment commands of `fedtune`: certs, keys, server, client, run."""

from __future__ import annotations

import sys

from fedtune.config import parse_assignment
from fedtune.deploy import budget_report
from fedtune.deploy.approved import approve
from fedtune.driver import app_dir


def add_parsers(sub) -> None:
    p = sub.add_parser("certs", help="make a CA and the server's TLS certificate",
                       description="A CA (ca.crt, ca.key) and a server certificate (server.pem, server.key) naming "
                                   "every host name and address clients use to reach the server.")
    p.add_argument("--host", action="append", required=True, metavar="NAME",
                   help="a DNS name or IP address clients dial (repeat for each)")
    p.add_argument("--out", default="certs", help="folder for the files (default: certs)")
    p.add_argument("--overwrite", action="store_true", help="replace existing files")

    p = sub.add_parser("keys", help="make client key pairs for SuperNode authentication",
                       description="One EC P-384 key pair per client, OpenSSH format: NAME (private, stays on the "
                                   "client) and NAME.pub (goes into the server's key folder).")
    p.add_argument("names", nargs="+", metavar="NAME", help="client names")
    p.add_argument("--out", default="keys", help="folder for the keys (default: keys)")
    p.add_argument("--overwrite", action="store_true", help="replace existing keys")

    p = sub.add_parser("server", help="run the federation's server (a Flower SuperLink)")
    ssub = p.add_subparsers(dest="action", required=True)
    s = ssub.add_parser("start", help="start the SuperLink with TLS and client authentication; registers server.keys/*.pub")
    s.add_argument("config", nargs="?", default="server/server.toml", help="server config (default: server/server.toml)")
    s.add_argument("--insecure", action="store_true", help="no TLS, no authentication (trusted test networks only)")
    s = ssub.add_parser("register", help="register one more client's public key with the running server")
    s.add_argument("config", help="server config")
    s.add_argument("public_key", help="the client's NAME.pub")

    p = sub.add_parser("client", help="run a data holder's client (a Flower SuperNode)")
    csub = p.add_subparsers(dest="action", required=True)
    c = csub.add_parser("start", help="connect to the server with this client's key, data and budget")
    c.add_argument("config", nargs="?", default="client/client.toml", help="client config (default: client/client.toml)")
    c.add_argument("--insecure", action="store_true", help="no TLS, no authentication (trusted test networks only)")
    c = csub.add_parser("approve", help="approve a run's app (its hash, as `fedtune run` prints it) in client.toml")
    c.add_argument("config", help="client config")
    c.add_argument("app", nargs="?", default="", help="the app's sha256, or an app folder (default: this installation's)")

    p = sub.add_parser("budget", help="a data holder's lifetime privacy spend on its data set (client machine)",
                       description="Each run that trained on the client's data set, its ε, the composed lifetime ε "
                                   "and what remains of client.budget. Exit 1 when --verify finds a problem.")
    p.add_argument("config", nargs="?", default="client/client.toml", help="client config (default: client/client.toml)")
    p.add_argument("--verify", action="store_true", help="recompute every ε with dp-accounting (the chain is always checked)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser("run", help="start the federation's run on the server and follow it to the end",
                       description="Exit 0 when the run completed, 1 when it failed (Flower's own status is read; "
                                   "`flwr run` exits 0 either way), 2 on a mistake in the config.")
    p.add_argument("config", nargs="?", default="server/server.toml", help="server config (default: server/server.toml)")
    p.add_argument("--insecure", action="store_true", help="talk to a server started with --insecure")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its last completed round")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a run config key")


def cmd_certs(args) -> int:
    from fedtune.certs import make_certs  # lazy: cryptography

    paths = make_certs(args.out, args.host, overwrite=args.overwrite)
    print(f"CA: {paths['ca.crt']} (give it to every client) and {paths['ca.key']} (keep it offline)")
    print(f"server: {paths['server.pem']}, {paths['server.key']} for {', '.join(args.host)}")
    return 0


def cmd_keys(args) -> int:
    from fedtune.certs import make_client_key  # lazy: cryptography

    for name in args.names:
        private, public = make_client_key(args.out, name, overwrite=args.overwrite)
        print(f"{name}: private key {private} (stays on the client), public key {public} (goes to the server's key folder)")
    return 0


def cmd_server(args) -> int:
    from fedtune.deploy import launch  # lazy: torch, flwr (through the server's resume check)

    if args.action == "register":
        launch.register_key(args.config, args.public_key)
        print(f"registered {args.public_key}")
        return 0
    return launch.start_server(args.config, args.insecure)


def cmd_client(args) -> int:
    from fedtune.deploy import launch  # lazy: torch, flwr (through the server's resume check)

    if args.action == "approve":
        print(f"approved app sha256 {approve(args.config, args.app or str(app_dir()))} in {args.config}")
        return 0
    return launch.start_client(args.config, args.insecure)


def cmd_run(args) -> int:
    from fedtune.deploy import launch  # lazy: torch, flwr (through the server's resume check)

    overrides = dict(parse_assignment(item) for item in args.set)
    run_dir = launch.run(args.config, args.insecure, resume=args.resume, overrides=overrides)
    print(f"run folder: {run_dir}")
    print(f"audit: fedtune audit {run_dir} --verify (after copying each client's ledger into {run_dir}/clients/)",
          file=sys.stderr)
    return 0


def cmd_budget(args) -> int:
    return budget_report.cmd_budget(args)


COMMANDS = {"budget": cmd_budget, "certs": cmd_certs, "keys": cmd_keys, "server": cmd_server, "client": cmd_client, "run": cmd_run}
