"""A site runs only the app bundles its policy approves (executor/approved_app.py)."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path
from typing import Any, ClassVar, cast

import pytest
from typer.testing import CliRunner

from drills.unapproved_app import app_copy
from executor.approved_app import AppRefused, bundle_hash, check_bundle, gate
from fedadapt.cli import app as cli
from shared.protocol import REFUSED


def _bundle(text: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("pyproject.toml", "[project]\nname = 'x'\n")
        zf.writestr("client/client_app.py", text)
    return buf.getvalue()


def _policy(tmp_path: Path, *hashes: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(f"approved-apps = {list(hashes)!r}\n".replace("'", '"'), encoding="utf-8")
    return path


def _sha(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def test_approved_bundle_passes_and_one_byte_changed_is_refused(tmp_path: Path) -> None:
    good, bad = _bundle("x = 0\n"), _bundle("x = 1\n")
    policy = _policy(tmp_path, _sha(good))
    assert check_bundle(good, _sha(good), "north", policy).approved
    verdict = check_bundle(bad, _sha(bad), "north", policy)
    assert not verdict.approved and verdict.sha256 == _sha(bad)
    assert verdict.reason == (
        f"[site north] refused by policy rule 'approved-apps': app bundle sha256 {_sha(bad)} "
        "is not approved; review it and add its hash to the site's approved-apps")
    # The policy file is named in the site's log only, never in what the coordinator gets.
    assert verdict.note == f"policy {policy.resolve()}"


def test_hash_is_computed_from_the_bytes_not_taken_from_the_bundle(tmp_path: Path) -> None:
    good, bad = _bundle("x = 0\n"), _bundle("x = 1\n")
    policy = _policy(tmp_path, _sha(good))
    # The bad bundle claims the approved hash: refused, with its real hash named.
    verdict = check_bundle(bad, _sha(good), "north", policy)
    assert not verdict.approved and _sha(bad) in verdict.reason
    # The approved bytes under another name (Flower loads the app from the named folder).
    verdict = check_bundle(good, _sha(bad), "north", policy)
    assert not verdict.approved and "must be named by its own hash" in verdict.reason
    # Exactly: Flower names the app's folder by the stated hash's first characters.
    assert not check_bundle(good, _sha(good).upper(), "north", policy).approved


def test_policy_without_approved_apps_runs_any_bundle(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text("min-rows = 5\n", encoding="utf-8")
    content = _bundle("anything\n")
    assert check_bundle(content, _sha(content), "north", path).approved


def test_missing_or_broken_policy_refuses(tmp_path: Path) -> None:
    content = _bundle("x\n")
    verdict = check_bundle(content, _sha(content), "north", None)
    assert not verdict.approved and "no policy file" in verdict.reason
    broken = tmp_path / "broken.toml"
    broken.write_text('approved-apps = ["not-a-hash"]\n', encoding="utf-8")
    verdict = check_bundle(content, _sha(content), "north", broken)
    assert not verdict.approved and "policy file cannot be used" in verdict.reason
    assert f"{broken.resolve()}:1:1" in verdict.note and str(tmp_path) not in verdict.reason


def test_command_line_policy_wins_over_node_config(tmp_path: Path) -> None:
    content = _bundle("x\n")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    strict = _policy(tmp_path / "a", "0" * 64)
    lax = _policy(tmp_path / "b", _sha(content))
    assert not check_bundle(content, _sha(content), "north", strict, str(lax)).approved
    assert check_bundle(content, _sha(content), "north", None, str(lax)).approved


class _Context:
    node_id = 7
    node_config: ClassVar[dict[str, str]] = {"site-name": "north"}


def test_gate_refuses_before_install_and_replies_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, task_identity: None) -> None:
    """Flower's ClientApp process, behind the gate: a refused bundle is never installed.

    The refusal is built by the site's one reply builder and is in the site's audit log.
    The approved path (install, check, load) is in tests/attacks/test_6_approved_code.py.
    """
    from flwr.app import Context, Message, RecordDict
    from flwr.supercore.fab import Fab
    from flwr.supernode.runtime import run_clientapp as flwr_runtime

    from client.audit_log import read_audit
    from shared.protocol import STATS

    good, bad = _bundle("x = 0\n"), _bundle("x = 1\n")
    pushed: list[Message] = []
    installed: list[bytes] = []
    msg = Message(content=RecordDict(), dst_node_id=7, message_type=STATS)
    site_dir = tmp_path / "site"
    context = Context(run_id=7, node_id=7, node_config={
        "site-name": "north", "data-file": str(tmp_path / "data.csv"),
        "site-dir": str(site_dir)}, state=RecordDict(), run_config={})

    def fake_pull(client: Any) -> Any:
        return msg, context, "run", Fab(_sha(bad), bad, {})

    def fake_install(fab_file: bytes, install_dir: Path | None = None,
                     skip_prompt: bool = False) -> Path:
        installed.append(fab_file)
        return tmp_path

    monkeypatch.setattr(flwr_runtime, "pull_task_input", fake_pull)
    monkeypatch.setattr(flwr_runtime, "install_from_fab", fake_install)
    monkeypatch.setattr(flwr_runtime, "push_message", lambda _c, m, _x: pushed.append(m))
    policy = _policy(tmp_path, _sha(good))
    with gate(policy) as state:
        with pytest.raises(AppRefused, match=_sha(bad)):
            flwr_runtime.pull_task_input(cast(Any, None))
        (reply,) = pushed
        assert reply.has_error() and reply.error.code == REFUSED
        assert _sha(bad) in str(reply.error.reason)
        assert str(reply.error.reason).startswith(
            "[site north] refused by policy rule 'approved-apps': app bundle sha256")
        assert str(tmp_path) not in str(reply.error.reason)  # nor the policy file's path
        assert reply.metadata.reply_to_message_id == msg.metadata.message_id
        (entry,) = read_audit(site_dir).entries
        assert entry["status"] == "refused" and _sha(bad) in entry["error"]["reason"]
        # Fail closed: installing what the check did not approve is refused too.
        with pytest.raises(AppRefused, match="not checked"):
            flwr_runtime.install_from_fab(bad, skip_prompt=True)
        assert installed == [] and state.approved == [] and state.task is None
    assert flwr_runtime.pull_task_input is fake_pull  # restored
    assert flwr_runtime.install_from_fab is fake_install


def test_forget_modules_drops_only_the_bundles_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    from executor.approved_app import _forget_modules

    for name in ("fakepkg", "fakepkg.sub", "fakepkgx"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    _forget_modules({"fakepkg"})
    assert "fakepkg" not in sys.modules and "fakepkg.sub" not in sys.modules
    assert "fakepkgx" in sys.modules


def test_app_hash_is_deterministic_and_sees_one_byte(tmp_path: Path) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    one = app_copy(tmp_path / "a" / "fedadapt", markers, on=False)
    other = app_copy(tmp_path / "b" / "fedadapt", markers, on=False)
    changed = app_copy(tmp_path / "c" / "fedadapt", markers, on=True)
    assert bundle_hash(one) == bundle_hash(one) == bundle_hash(other)
    assert bundle_hash(changed) != bundle_hash(one)
    a = (one / "client" / "client_app.py").read_bytes()
    c = (changed / "client" / "client_app.py").read_bytes()
    assert len(a) == len(c) and sum(x != y for x, y in zip(a, c, strict=True)) == 1
    # The changed line writes its marker when run (the slow test shows it never does at a site).
    exec(c.decode().splitlines()[-1])
    assert (markers / "unapproved-ran").exists()


def test_app_hash_command(tmp_path: Path) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    project = app_copy(tmp_path / "fedadapt", markers, on=False)
    result = CliRunner().invoke(cli, ["app-hash", str(project)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == bundle_hash(project)
    result = CliRunner().invoke(cli, ["app-hash", str(tmp_path / "markers")])
    assert result.exit_code == 1 and "no pyproject.toml" in result.output


@pytest.mark.slow  # in the default run: the approved app's real-process smoke test
@pytest.mark.timeout(900)
def test_deployed_sites_refuse_unapproved_bundle(tmp_path: Path, no_leftovers: None) -> None:
    """TLS deployment, 2 sites with --isolation process + fedadapt site-exec; one byte changed."""
    from drills.unapproved_app import approved_app_run, refused_everywhere

    seen = approved_app_run(tmp_path / "drill")
    checks = refused_everywhere(seen)
    assert all(checks.values()), (checks, seen.get("unapproved_error"), seen.get("markers"))
    bad = seen["unapproved_hash"]
    # Every site said it, with the hash, in its log and in its reply.
    assert set(seen["site_logs"]) == {"hospital-a", "hospital-b"}
    assert all(any(bad in line for line in lines) for lines in seen["site_logs"].values())
    # Nothing of the refused bundle at the sites; the approved one ran, its own code.
    assert seen["markers_after_unapproved"] == []
    assert seen["markers"] == ["imported"]
    # Each task installs into a Flower home of its own, removed when it ends: nothing is left
    # in the site's FLWR_HOME/apps for a later run to load.
    assert seen["installed_after_unapproved"] == seen["installed"] == {
        "hospital-a": [], "hospital-b": []}
    # The hash fedadapt computes is the one Flower's `flwr run` sent (SuperLink's record).
    assert {r["fab-hash"] for r in seen["runs"]} == {bad, seen["approved_hash"]}
    assert seen["report"]["rounds"]
