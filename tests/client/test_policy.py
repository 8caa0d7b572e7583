"""A site's policy: the file is checked strictly, and requests outside it are refused whole."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.client_app import app as client_app
from client.policy import NO_POLICY, PolicyError, PolicyRefusal, admit, read_policy
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


def test_an_empty_policy_allows_everything(tmp_path: Path) -> None:
    """An empty file is the same as no policy: every phase, no minimum, no budget."""
    policy = read_policy(_write(tmp_path, "# nothing restricted\n"))
    assert policy.phases == NO_POLICY.phases and policy.min_rows == 0
    assert math.isinf(policy.max_epsilon_total) and policy.approved_apps == ()


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


def test_training_rules_are_refused_with_the_rule_named(tmp_path: Path) -> None:
    """Rounds beyond max-rounds, DP required but off, a run's epsilon above the policy's."""
    policy = read_policy(_write(tmp_path, "max-rounds = 3\nrequire-dp = true\n"
                                          "max-epsilon-run = 2\n"))
    dp = {"dp": "record", "dp-epsilon": 1.0, "dp-delta": 1e-5}
    admit(policy, "train", {**dp, "server-round": 3})  # accepted
    cases = [({**dp, "server-round": 2, "round-offset": 2}, "max-rounds"),
             ({"dp": "off", "server-round": 1}, "require-dp"),
             ({**dp, "dp-epsilon": 3.0, "server-round": 1}, "max-epsilon-run"),
             ({**dp, "dp-delta": 1e-3, "server-round": 1}, "delta")]
    for config, rule in cases:
        with pytest.raises(PolicyRefusal) as err:
            admit(policy, "train", config)
        assert err.value.rule == rule


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


def test_a_feature_observed_in_too_few_rows_refuses_the_stats_reply(
    tmp_path: Path, task_identity: None
) -> None:
    """Enough rows, but a feature's sum over too few observed values: the reply is refused."""
    ctx = _context(tmp_path, "min-rows = 20\n", rows=300)
    data = Path(str(ctx.node_config["data-file"]))
    lines = data.read_text().splitlines()
    col = lines[0].split(",").index("systolic_bp")
    out = [lines[0]]
    for i, line in enumerate(lines[1:]):
        cells = line.split(",")
        if i >= 10:  # blood pressure measured in 10 rows only (about 7 of them training rows)
            cells[col] = ""
        out.append(",".join(cells))
    data.write_text("\n".join(out) + "\n")
    reply = _stats(ctx)
    assert reply.has_error() and reply.error.code == protocol.REFUSED
    assert "feature 'systolic_bp'" in str(reply.error.reason)
    assert _stats(_context(tmp_path / "ok", "min-rows = 20\n", rows=300)).has_content()


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


def test_max_rounds_counts_the_rounds_the_site_admitted_not_the_numbers_it_is_sent(
    tmp_path: Path,
) -> None:
    """Round numbers, repeats or offsets chosen by the coordinator cannot buy more rounds."""
    policy = read_policy(_write(tmp_path, "max-rounds = 2\n"))
    state = RecordDict()
    admit(policy, "train", {"server-round": 1}, state)
    admit(policy, "train", {"server-round": 1, "repeat": 1}, state)
    for config in ({"server-round": 1}, {"server-round": 2, "round-offset": -1},
                   {"server-round": 1, "repeat": 2}):
        with pytest.raises(PolicyRefusal) as err:
            admit(policy, "train", config, state)
        assert err.value.rule == "max-rounds"
    admit(policy, "stats", {}, state)  # other phases are not rounds
