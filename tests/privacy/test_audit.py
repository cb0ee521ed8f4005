"""`fedtune audit`: the table, `--verify` (independent recomputation, hash chains, ledger
heads), bad ledgers, and the empirical check (canaries, secrets) on a tiny run; the check on
the real model is in test_memorization_*.py."""

from __future__ import annotations

import json
import shutil

import pytest

from fedtune.privacy import Ledger
from fedtune.privacy.ledger import entry_hash
from fedtune.runfolder import read_jsonl
from tests.conftest import ROOT
from tests.memorization import fedtune, simulate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """3 tiny clients, record-level DP-SGD and client-level DP-FedAvg, canaries and secrets."""
    out = tmp_path_factory.mktemp("runs")
    return simulate(out, str(ROOT / "simulations" / "tiny.toml"), "--canaries", "12", "--secrets", "1",
                    "--set", "client_dp.enabled=true", "--set", "client_dp.epsilon=5")


@pytest.fixture
def copy(run_dir, tmp_path):
    """A private copy of the run to damage."""
    return shutil.copytree(run_dir, tmp_path / "run")


def test_audit_prints_every_ledger_and_verify_passes(run_dir):
    res = fedtune("audit", str(run_dir), "--verify")
    assert res.returncode == 0, res.stdout + res.stderr
    for name in ("client-0", "client-1", "client-2", "server"):
        assert name in res.stdout
    assert "one record" in res.stdout and "one client" in res.stdout
    assert "verification passed" in res.stdout
    audit = json.loads((run_dir / "audit.json").read_text())
    rows = {r["client"]: r for r in audit["rows"]}
    assert rows["server"]["level"] == "client" and rows["client-0"]["level"] == "record"
    assert all(r["rounds_joined"] == 2 and 0 < r["epsilon"] <= r["budget"] for r in rows.values())
    assert rows["server"]["epsilon"] <= 5.0 and rows["server"]["steps"] == 2
    assert audit["problems"] == [] and audit["verified"] is True
    assert (run_dir / "epsilon.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (run_dir / "audit.md").read_text()
    assert "Verification passed" in md and "| server | one client |" in md


def test_the_server_ledger_matches_what_it_did(run_dir):
    """Each round the server released one noisy average, and joined clients clipped their updates."""
    spends = Ledger(run_dir / "server" / "ledger.jsonl").spends()
    assert [s["round"] for s in spends] == [1, 2] and all(s["steps"] == 1 for s in spends)
    trains = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["phase"] == "train" and r["status"] == "ok"]
    assert trains and all(r["update-norm"] <= spends[0]["clip_norm"] * (1 + 1e-4) for r in trains)
    summary = json.loads((run_dir / "summary.json").read_text())["client_level"]
    assert summary["epsilon"] == spends[-1]["epsilon"] and summary["unit"].startswith("one client")
    assert "Client-level DP (DP-FedAvg)" in (run_dir / "summary.md").read_text()


def _edit_line(path, line_no, edit):
    lines = path.read_text().splitlines()
    entry = json.loads(lines[line_no - 1])
    edit(entry)
    lines[line_no - 1] = json.dumps(entry, sort_keys=True)
    path.write_text("\n".join(lines) + "\n")


def _one_error_line(res, *needles):
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("fedtune: error:")]
    assert len(errors) == 1, res.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_editing_one_number_fails_naming_the_file_and_line(copy):
    path = copy / "clients" / "client-1" / "ledger.jsonl"
    _edit_line(path, 2, lambda e: e.update(epsilon=e["epsilon"] / 2))  # under-report round 1
    for name in ("audit.json", "audit.md"):  # an earlier test may have audited the original run
        (copy / name).unlink(missing_ok=True)
    res = fedtune("audit", str(copy), "--verify")
    _one_error_line(res, "client-1/ledger.jsonl:2", "edited")
    assert not (copy / "audit.json").exists() and not (copy / "audit.md").exists()  # no report of a bad ledger


def test_a_truncated_ledger_fails_naming_the_line(copy):
    path = copy / "server" / "ledger.jsonl"
    path.write_bytes(path.read_bytes()[:-30])
    _one_error_line(fedtune("audit", str(copy)), "server/ledger.jsonl:3", "truncated")


def test_a_folder_that_is_not_a_run(tmp_path):
    _one_error_line(fedtune("audit", str(tmp_path)), str(tmp_path), "not a fedtune run folder")


def test_a_consistently_rewritten_ledger_is_caught_by_the_servers_ledger_heads(copy):
    """Someone rewrites a client's ledger with a lower ε and recomputes every hash: the chain
    is valid again, but no longer the one the server saw when the updates arrived."""
    path = copy / "clients" / "client-0" / "ledger.jsonl"
    entries = [json.loads(x) for x in path.read_text().splitlines()]
    prev = "0" * 64
    for e in entries:
        if e["type"] == "spend":
            e["noise_multiplier"] *= 2
        e["prev_hash"] = prev
        e["hash"] = prev = entry_hash(e)
    path.write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in entries))
    res = fedtune("audit", str(copy), "--verify")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "verification FAILED" in res.stdout
    assert "client-0/ledger.jsonl:2" in res.stdout and "ledger head" in res.stdout
    assert "dp-accounting recomputes" in res.stdout  # and the recorded ε no longer follows from σ


def test_empirical_audit_of_a_tiny_run_reports_both_checks(run_dir):
    res = fedtune("audit", str(run_dir), "--empirical")
    assert res.returncode == 0, res.stdout + res.stderr
    emp = json.loads((run_dir / "audit.json").read_text())["empirical"]
    assert emp["one_run"]["canaries"] == 12 and 0 < emp["one_run"]["included"] < 12
    assert 0 <= emp["one_run"]["epsilon_lower_bound"] <= emp["accountant_epsilon"]
    assert len(emp["secrets"]) == 1 and emp["secrets"][0]["max_exposure_bits"] == pytest.approx(13.2877, abs=1e-3)
    md = (run_dir / "audit.md").read_text()
    assert "ε̂ ≤ ε is expected" in md and "mean a bug" in md
