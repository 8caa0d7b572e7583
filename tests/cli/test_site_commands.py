"""A site's own commands: init-site, reset-ledger and site-results."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from client.audit_log import read_audit
from client.ledger import LEDGER
from client.policy import DEPLOYED, read_policy
from fedadapt.cli import app


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "100"})
    return result.exit_code, result.output


def test_init_site_makes_a_private_folder_with_safe_defaults_and_keeps_what_exists(
    tmp_path: Path,
) -> None:
    """Keys and policy 0600 in a 0700 folder, the policy the deployment's; run twice: kept."""
    site = tmp_path / "site"
    code, out = _run("init-site", str(site), "--name", "north", "--data-file", "/d/x.csv")
    assert code == 0, out
    assert "created: site.key, split.key, policy.toml, audit.jsonl" in out
    assert f'policy="{site}/policy.toml"' in out and 'data-file="/d/x.csv"' in out
    assert site.stat().st_mode & 0o777 == 0o700
    for name in ("site.key", "split.key", "policy.toml", "audit.jsonl"):
        assert (site / name).stat().st_mode & 0o777 == 0o600, name
    policy = read_policy(site / "policy.toml")
    assert policy.require_dp and policy.max_epsilon_run == DEPLOYED.max_epsilon_run
    assert max(len(line) for line in (site / "policy.toml").read_text().splitlines()) <= 100
    key = (site / "split.key").read_bytes()
    assert [e["event"] for e in read_audit(site).entries] == ["site-init"]
    code, out = _run("init-site", str(site), "--name", "north")
    assert code == 0 and "created: nothing" in out
    assert (site / "split.key").read_bytes() == key


def test_init_site_refuses_a_bad_name_in_one_line(tmp_path: Path) -> None:
    code, out = _run("init-site", str(tmp_path / "site"), "--name", "no/slash")
    assert code == 1 and out.strip().count("\n") == 0 and "not allowed" in out
    assert "Traceback" not in out


def test_reset_ledger_restores_from_the_audit_log_and_refuses_a_broken_one(
    tmp_path: Path,
) -> None:
    """What the audit log last recorded comes back; an edited log restores nothing."""
    from client.ledger import count_round

    site = tmp_path / "site"
    assert _run("init-site", str(site), "--name", "north")[0] == 0
    count_round(site, lambda rounds: None)
    count_round(site, lambda rounds: None)
    (site / LEDGER).unlink()
    code, out = _run("reset-ledger", "--site-dir", str(site))
    assert code == 0 and "2 training rounds" in out, out
    assert json.loads((site / LEDGER).read_text())["rounds"] == 2
    log = site / "audit.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join([lines[0], *lines[2:]]) + "\n")  # an entry deleted
    code, out = _run("reset-ledger", "--site-dir", str(site))
    assert code == 1 and "audit.jsonl:2:" in out and "broken audit log" in out


def test_site_results_shows_each_kept_run_and_says_when_there_is_none(tmp_path: Path) -> None:
    site = tmp_path / "site"
    code, out = _run("site-results", "--site-dir", str(site))
    assert code == 1 and "no kept results yet" in out
    (site / "evaluations").mkdir(parents=True)
    metrics = {"n-test": 30.0, "positives-test": 9.0, "local.auc": 0.71, "source.auc": 0.74,
               "adapted.auc": 0.78, "diff.adapted-local.auc": 0.07,
               "diff.adapted-local.auc_lo": 0.01, "diff.adapted-local.auc_hi": 0.13}
    (site / "evaluations" / "run-5-repeat-1.json").write_text(json.dumps(
        {"run": 5, "repeat": 0, "metrics": metrics, "model-choice": "correction C=1"}))
    code, out = _run("site-results", "--site-dir", str(site))
    assert code == 0, out
    row = out.splitlines()[-1].split()
    assert row[:7] == ["5", "1", "30", "9", "0.710", "0.740", "0.780"]
    assert "0.070 [0.010, 0.130]" in out and "corr. C=1" in out
