"""A site's policy: the file is checked strictly, and requests outside it are refused whole."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.client_app import app as client_app
from client.contract import DPRequest
from client.ledger import LEDGER
from client.policy import DEPLOYED, NO_POLICY, PolicyError, PolicyRefusal, admit, read_policy
from client.site import SiteSettings
from shared import protocol
from shared.schema import load_schema
from simulations.generator import generate

SCHEMA = load_schema("synthetic")


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_full_policy_is_read_with_every_rule(tmp_path: Path) -> None:
    """Every key of a policy file lands in its rule; the description says each in words."""
    digest = "ab" * 32
    policy = read_policy(_write(tmp_path, f"""
approved-apps = ["{digest.upper()}"]
phases = ["stats", "train"]
min-rows = 25
max-rounds = 12
require-dp = true
max-epsilon-run = 2.5
max-epsilon-total = 8
delta = 1e-6
"""))
    assert policy.approved_apps == (digest,)
    assert policy.phases == ("stats", "train")
    assert (policy.min_rows, policy.max_rounds, policy.require_dp) == (25, 12, True)
    assert (policy.max_epsilon_run, policy.max_epsilon_total, policy.delta) == (2.5, 8.0, 1e-6)
    text = "\n".join(policy.describe())
    assert "refuses adapt, evaluate" in text and "at least 25 rows" in text
    assert "at most 12 rounds" in text and "epsilon 8 over all runs" in text


def test_an_empty_policy_takes_the_defaults_of_where_the_site_is(tmp_path: Path) -> None:
    """Empty at a simulated site: no policy. Empty at a deployed site: the safe defaults."""
    path = _write(tmp_path, "# nothing restricted\n")
    simulated = read_policy(path, deployed=False)
    assert simulated.phases == NO_POLICY.phases and simulated.min_rows == 0
    assert math.isinf(simulated.max_epsilon_total) and simulated.approved_apps == ()
    assert not simulated.require_dp
    deployed = read_policy(path)
    assert deployed.require_dp and deployed == replace(DEPLOYED, path=path.resolve())
    assert math.isfinite(deployed.max_epsilon_run) and math.isfinite(deployed.max_epsilon_total)
    opened = read_policy(_write(tmp_path, "require-dp = false\n"))
    assert not opened.require_dp and opened.min_rows == DEPLOYED.min_rows


@pytest.mark.parametrize("text", [
    "require-dp = true\nmax-epsilon-run = inf\n",
    "require-dp = true\nmax-epsilon-total = inf\n",
])
def test_requiring_dp_without_finite_caps_is_an_error(tmp_path: Path, text: str) -> None:
    """require-dp with an infinite cap would accept any epsilon the coordinator asks for."""
    with pytest.raises(PolicyError, match="require-dp needs a finite"):
        read_policy(_write(tmp_path, text), deployed=False)


def test_the_input_bound_must_be_finite_and_positive(tmp_path: Path) -> None:
    """It is what keeps every number the site computes finite."""
    with pytest.raises(PolicyError, match="input-bound must be finite"):
        read_policy(_write(tmp_path, "input-bound = inf\n"))
    with pytest.raises(PolicyError, match="input-bound must be positive"):
        read_policy(_write(tmp_path, "input-bound = 0\n"))
    assert read_policy(_write(tmp_path, "input-bound = 4\n")).input_bound == 4.0


@pytest.mark.parametrize(("text", "where", "words"), [
    ("min-rows = 5\n  max-round = 3\n", ":2:3:", "unknown key 'max-round'"),
    ("min-rows = -1\n", ":1:1:", "whole number"),
    ("min-rows = 2.5\n", ":1:1:", "whole number"),
    ("require-dp = \"yes\"\n", ":1:1:", "true or false"),
    ("max-rounds = 3\nmax-epsilon-run = 0\n", ":2:1:", "must be positive"),
    ("phases = [\"train\", \"predict\"]\n", ":1:1:", "unknown phase"),
    ("approved-apps = [\"abc\"]\n", ":1:19:", "sha256"),
    ("approved-apps = [\n  \"abc\",\n]\n", ":2:4:", "entry 'abc'"),
    ("min-rows = 5\n[extra]\na = 1\n", ":2:1:", "unknown table 'extra'"),
    ("max-epsilon-run = " + "9" * 320 + "\n", ":1:1:", "too large"),
    ("delta = 2\n", ":1:1:", "between 0 and 1"),
    ("min-rows = 1\nphases = = 2\n", ":2:", "invalid TOML"),
])
def test_a_bad_policy_is_one_clear_error_naming_file_line_and_column(
    tmp_path: Path, text: str, where: str, words: str
) -> None:
    """An unknown key or a bad value names file, line and column and what to write."""
    path = _write(tmp_path, text)
    with pytest.raises(PolicyError) as err:
        read_policy(path)
    assert f"{path.resolve()}{where}" in str(err.value)
    assert words in str(err.value)


def test_a_policy_file_in_another_encoding_names_where_and_what_to_do(tmp_path: Path) -> None:
    """Latin-1 bytes are placed by line and column; a byte-order mark is tolerated."""
    path = tmp_path / "policy.toml"
    path.write_bytes(b"min-rows = 5\n# caf\xe9\n")
    with pytest.raises(PolicyError, match=r"policy.toml:2:6: not UTF-8 text: save"):
        read_policy(path)
    path.write_bytes(b"\xef\xbb\xbfmin-rows = 5\n")
    assert read_policy(path).min_rows == 5
    with pytest.raises(PolicyError, match="is a folder"):
        read_policy(tmp_path)


def _round(dp: DPRequest | None) -> Any:
    """What admit reads of a parsed train message: its DP request."""
    return SimpleNamespace(dp=dp)


def _site(tmp_path: Path, simulated: bool = False) -> SiteSettings:
    return SiteSettings("site-a", tmp_path / "data.csv", (), tmp_path / "site",
                        simulated=simulated)


def test_training_rules_are_refused_with_the_rule_named(tmp_path: Path) -> None:
    """DP required but off, a run's epsilon above the policy's, a larger delta, max-rounds."""
    policy = read_policy(_write(tmp_path, "max-rounds = 3\nrequire-dp = true\n"
                                          "max-epsilon-run = 2\nmax-epsilon-total = 5\n"))
    site = _site(tmp_path)
    dp = DPRequest("record", 1.0, 1e-5, 1.0, 30)
    cases = [(None, "require-dp"), (replace(dp, mode="client"), "require-dp"),
             (replace(dp, epsilon=3.0), "max-epsilon-run"), (replace(dp, delta=1e-3), "delta")]
    for request, rule in cases:
        with pytest.raises(PolicyRefusal) as err:
            admit(policy, "train", _round(request), site)
        assert err.value.rule == rule
    for _ in range(3):
        admit(policy, "train", _round(dp), site)  # refusals above were not counted
    with pytest.raises(PolicyRefusal) as err:
        admit(policy, "train", _round(dp), site)
    assert err.value.rule == "max-rounds"


def _context(tmp_path: Path, policy: str, rows: int = 0) -> Context:
    manifest = generate(tmp_path / "data", n_sites=1, seed=3)
    data = manifest.parent / "hospital-a.csv"
    if rows:
        lines = data.read_text().splitlines()
        data.write_text("\n".join(lines[: rows + 1]) + "\n")
    node_config: dict[str, Any] = {
        "data-file": str(data), "site-dir": str(tmp_path / "site"), "site-name": "site-a",
        "policy": str(_write(tmp_path, policy)),
    }
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(),
                   run_config={})


def _stats(ctx: Context) -> Message:
    config: dict[str, Any] = {
        "schema": "synthetic", "schema-digest": SCHEMA.digest(), "protocol": "default",
        "split-seed": 42, "test-fraction": 0.3, "repeat": 0}
    msg = Message(content=RecordDict({protocol.CONFIG: ConfigRecord(config)}), dst_node_id=1,
                  message_type=protocol.STATS)
    return client_app(msg, ctx)


def test_a_phase_the_policy_leaves_out_gets_a_refusal_not_an_answer(
    tmp_path: Path, task_identity: None
) -> None:
    """The ClientApp answers a forbidden phase with a REFUSED error naming the rule."""
    reply = _stats(_context(tmp_path, 'phases = ["train", "evaluate"]\n'))
    assert reply.has_error() and not reply.has_content()
    assert reply.error.code == protocol.REFUSED
    assert "[site site-a] refused by policy rule 'phases'" in str(reply.error.reason)


def test_too_few_rows_for_an_aggregate_is_refused_whole(
    tmp_path: Path, task_identity: None
) -> None:
    """A site with fewer training rows than min-rows sends no count or sum at all."""
    reply = _stats(_context(tmp_path, "min-rows = 50\n", rows=40))
    assert reply.has_error() and reply.error.code == protocol.REFUSED
    reason = str(reply.error.reason)
    assert "policy rule 'min-rows'" in reason
    assert "fewer rows than the policy's min-rows = 50" in reason
    assert "40" not in reason and "28" not in reason  # no count said


def _keep_first(data: Path, column: str, rows: int) -> None:
    """Empty ``column`` in every row of the file after the first ``rows``."""
    lines = data.read_text().splitlines()
    col = lines[0].split(",").index(column)
    out = [lines[0]]
    for i, line in enumerate(lines[1:]):
        cells = line.split(",")
        cells[col] = cells[col] if i < rows else ""
        out.append(",".join(cells))
    data.write_text("\n".join(out) + "\n")


def test_a_feature_observed_in_too_few_rows_refuses_the_stats_reply(
    tmp_path: Path, task_identity: None
) -> None:
    """Enough rows, but a feature's sum over too few observed values: the reply is refused."""
    ctx = _context(tmp_path, "min-rows = 20\nrequire-dp = false\n", rows=300)
    # Blood pressure measured in 10 rows only (about 7 of them training rows).
    _keep_first(Path(str(ctx.node_config["data-file"])), "systolic_bp", 10)
    reply = _stats(ctx)
    assert reply.has_error() and reply.error.code == protocol.REFUSED
    assert "feature 'systolic_bp'" in str(reply.error.reason)
    assert _stats(_context(tmp_path / "ok", "min-rows = 20\nrequire-dp = false\n",
                           rows=300)).has_content()


def test_a_site_feature_observed_in_too_few_rows_is_left_out_not_the_reply(
    tmp_path: Path, task_identity: None
) -> None:
    """Glucose in 10 rows under min-rows 20: the reply goes without glucose's sums or name.

    The site then joins no glucose group; with glucose in every row, both are there.
    """
    for measured, expected in ((10, ""), (10_000, "glucose")):
        ctx = _context(tmp_path / str(measured), "min-rows = 20\nrequire-dp = false\n",
                       rows=300)
        ctx.node_config["site-features"] = "glucose"
        _keep_first(Path(str(ctx.node_config["data-file"])), "glucose", measured)
        reply = _stats(ctx)
        assert reply.has_content(), reply.error.reason if reply.has_error() else ""
        site = reply.content.config_records[protocol.SITE]
        assert site[protocol.SITE_FEATURES] == expected
        metrics = reply.content.metric_records[protocol.METRICS]
        assert ("glucose.count" in metrics) == bool(expected)


def test_a_site_under_require_dp_sends_no_site_feature_sums(
    tmp_path: Path, task_identity: None
) -> None:
    """No group trains under DP: the one noisy stats release stays the shared features'."""
    ctx = _context(tmp_path, "", rows=300)  # the deployment's default: require-dp
    ctx.node_config["site-features"] = "glucose"
    reply = _stats(ctx)
    assert reply.has_content()
    assert reply.content.config_records[protocol.SITE][protocol.SITE_FEATURES] == ""
    assert not any(k.startswith("glucose.") for k in reply.content.metric_records[
        protocol.METRICS])


def test_the_site_executor_s_policy_is_the_one_the_clientapp_applies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, task_identity: None
) -> None:
    """Under `fedadapt site-exec --policy`, its policy wins over node_config's (or none)."""
    from client.policy import POLICY_ENV

    ctx = _context(tmp_path, "# node_config's policy: everything allowed\n")
    strict = tmp_path / "exec-policy.toml"
    strict.write_text('phases = ["train"]\n', encoding="utf-8")
    assert _stats(ctx).has_content()
    monkeypatch.setenv(POLICY_ENV, str(strict))
    reply = _stats(ctx)
    assert reply.has_error() and "policy rule 'phases'" in str(reply.error.reason)
    del ctx.node_config["policy"]
    assert _stats(ctx).has_error()  # no policy in node_config: the executor's still applies


def test_max_rounds_counts_every_round_the_site_took_part_in_over_all_runs(
    tmp_path: Path,
) -> None:
    """Round numbers, repeats, offsets or new runs chosen by the coordinator buy no rounds.

    The count lives in the site's ledger, not in a run's state.
    """
    policy = read_policy(_write(tmp_path, "max-rounds = 2\n"), deployed=False)
    site = _site(tmp_path, simulated=True)
    admit(policy, "train", _round(None), site)  # run 1
    admit(policy, "train", _round(None), site)  # run 2, round 1 again
    with pytest.raises(PolicyRefusal) as err:
        admit(policy, "train", _round(None), site)  # any later run
    assert err.value.rule == "max-rounds"
    admit(policy, "stats", _round(None), site)  # other phases are not rounds
    assert json.loads((site.site_dir / LEDGER).read_text())["rounds"] == 2
