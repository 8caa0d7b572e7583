"""Attack 6: code planted beside the approved app never runs; the approved bundle's code does.

Flower skips installing a bundle whose folder exists and loads by the run's fab_id and
version, which the coordinator supplies; here Flower's own run_clientapp runs behind the gate.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import shutil
import stat
import sys
import tempfile
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NoReturn

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.cli.build import build_fab_from_disk
from flwr.supercore.fab import Fab
from flwr.supercore.run import Run
from flwr.supernode.runtime import run_clientapp as flwr_runtime

from executor.approved_app import GateState, gate, installed_differences, read_bundle
from shared.protocol import REFUSED, STATS

PUBLISHER, NAME, VERSION = "sitetest", "gate-test-app", "1.0.0"
FAB_ID = f"{PUBLISHER}/{NAME}"


def _write_app(folder: Path, pkg: str, marker: Path) -> Path:
    """A tiny Flower app whose ClientApp module writes ``marker`` when it is imported."""
    (folder / pkg).mkdir(parents=True)
    (folder / "pyproject.toml").write_text(
        f'[project]\nname = "{NAME}"\nversion = "{VERSION}"\ndependencies = []\n\n'
        f'[tool.flwr.app]\npublisher = "{PUBLISHER}"\n\n[tool.flwr.app.components]\n'
        f'serverapp = "{pkg}.server_app:app"\nclientapp = "{pkg}.client_app:app"\n',
        encoding="utf-8")
    (folder / pkg / "__init__.py").write_text("", encoding="utf-8")
    (folder / pkg / "helper.py").write_text("ANSWER = 42\n", encoding="utf-8")
    (folder / pkg / "server_app.py").write_text("app = None\n", encoding="utf-8")
    (folder / pkg / "client_app.py").write_text(
        "from pathlib import Path\n\n"
        "from flwr.app import Message, MetricRecord, RecordDict\n"
        "from flwr.clientapp import ClientApp\n\n"
        f"from {pkg}.helper import ANSWER\n\n"
        f"Path({str(marker)!r}).write_text('ran')\n"
        "app = ClientApp()\n\n\n"
        '@app.query("stats")\n'
        "def stats(msg, context):\n"
        '    return Message(RecordDict({"m": MetricRecord({"answer": ANSWER})}), reply_to=msg)\n',
        encoding="utf-8")
    return folder


def _sha(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


@dataclass
class Site:
    """One site's files: its Flower home, policy and markers, and the approved bundle."""

    pkg: str
    home: Path  # the site's FLWR_HOME, where a coordinator's earlier run could plant a folder
    markers: Path
    policy: Path
    bundle: bytes
    context: Context
    message: Message

    def folder_name(self, fab_id: str = FAB_ID, version: str = VERSION) -> str:
        """Flower's name of an app's folder: ``<publisher>.<name>.<version>.<hash8>``."""
        return f"{fab_id.replace('/', '.')}.{version}.{_sha(self.bundle)[:8]}"

    def plant(self, apps: Path, name: str) -> Path:
        """A folder of the app with the same package, whose import writes ``planted``."""
        return _write_app(apps / name, self.pkg, self.markers / "planted")

    def marks(self) -> list[str]:
        """The markers written: whose code was imported."""
        return sorted(p.name for p in self.markers.iterdir())


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, task_identity: None) -> Iterator[Site]:
    """A site with one approved tiny app; its modules and import path are undone afterwards."""
    pkg = f"gateapp_{uuid.uuid4().hex[:8]}"
    monkeypatch.setattr(sys, "path", [*sys.path])  # Flower's loader leaves the app's folder
    markers = tmp_path / "markers"
    markers.mkdir()
    bundle = build_fab_from_disk(_write_app(tmp_path / "approved", pkg, markers / "approved"))
    policy = tmp_path / "policy.toml"
    policy.write_text(f'approved-apps = ["{_sha(bundle)}"]\n', encoding="utf-8")
    context = Context(run_id=7, node_id=7, node_config={
        "site-name": "north", "data-file": str(tmp_path / "data.csv"),
        "site-dir": str(tmp_path / "site")}, state=RecordDict(), run_config={})
    message = Message(content=RecordDict(), dst_node_id=7, message_type=STATS)
    yield Site(pkg, Path(os.environ["FLWR_HOME"]), markers, policy, bundle, context, message)
    for mod in [m for m in sys.modules if m.split(".", 1)[0] == pkg]:
        del sys.modules[mod]


class _Exited(Exception):
    """Flower's flwr_exit, which ends the ClientApp process."""


class _Heartbeat:
    is_running = False

    def __init__(self, *_: Any) -> None:
        pass

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


@dataclass
class Ran:
    """What one task did behind the gate."""

    state: GateState
    pushed: list[Message]
    exit_code: int
    installed: list[str]  # the app folders in the gate's home when the task ended
    installs: int  # calls reaching Flower's installer

    @property
    def reason(self) -> str:
        """The reason of the one reply, a refusal."""
        (reply,) = self.pushed
        assert reply.has_error() and reply.error.code == REFUSED, reply
        return str(reply.error.reason)


def _run_task(monkeypatch: pytest.MonkeyPatch, site: Site, *, fab_id: str = FAB_ID,
              version: str = VERSION, content: bytes | None = None,
              after_install: Callable[[Path], None] | None = None,
              before: Callable[[GateState], object] | None = None) -> Ran:
    """Flower's own ``run_clientapp`` for one task, behind the gate; network and exit faked."""
    content = site.bundle if content is None else content
    run = Run.create_empty(7)
    run.fab_id, run.fab_version, run.fab_hash = fab_id, version, _sha(content)
    pushed: list[Message] = []
    installs: list[bytes] = []
    real_install = flwr_runtime.install_from_fab

    @functools.wraps(real_install)
    def install(fab_file: Any, install_dir: Path | None = None, skip_prompt: bool = False) -> Path:
        installs.append(fab_file)
        path: Path = real_install(fab_file, install_dir=install_dir, skip_prompt=skip_prompt)
        if after_install is not None:
            after_install(path)
        return path

    def flwr_exit(code: int, **_: Any) -> NoReturn:
        raise _Exited(code)

    fab = Fab(_sha(content), content, {})
    monkeypatch.setattr(flwr_runtime, "pull_task_input",
                        lambda _client: (site.message, site.context, run, fab))
    monkeypatch.setattr(flwr_runtime, "push_message", lambda _c, m, _x: pushed.append(m))
    monkeypatch.setattr(flwr_runtime, "install_from_fab", install)
    monkeypatch.setattr(flwr_runtime, "RuntimeHttpClient",
                        SimpleNamespace(from_server_address=lambda **_: SimpleNamespace()))
    monkeypatch.setattr(flwr_runtime, "HeartbeatSender", _Heartbeat)
    monkeypatch.setattr(flwr_runtime, "register_signal_handlers", lambda **_: None)
    monkeypatch.setattr(flwr_runtime, "event", lambda *_a, **_k: None)
    monkeypatch.setattr(flwr_runtime, "flwr_exit", flwr_exit)
    with gate(site.policy) as state:
        if before is not None:
            before(state)
        with pytest.raises(_Exited) as exited:
            flwr_runtime.run_clientapp("127.0.0.1:1", "token", True)
        apps = state.home / "apps"
        installed = sorted(p.name for p in apps.iterdir()) if apps.is_dir() else []
    # The private home is gone with the process; the site's FLWR_HOME and Flower are back.
    assert not state.home.exists() and os.environ["FLWR_HOME"] == str(site.home)
    assert flwr_runtime.install_from_fab is install
    return Ran(state, pushed, exited.value.args[0], installed, len(installs))


def _names_no_site_path(reason: str, site: Site, state: GateState) -> None:
    for local in (tempfile.gettempdir(), str(site.home), str(site.policy), str(state.home),
                  str(site.policy.resolve())):
        assert local not in reason, (local, reason)


def test_planted_folder_is_never_imported_the_approved_code_is(
        monkeypatch: pytest.MonkeyPatch, site: Site) -> None:
    """A folder planted under the approved hash's prefix in the site's home is never used."""
    planted = site.plant(site.home / "apps", site.folder_name())
    modes: list[int] = []
    ran = _run_task(monkeypatch, site, before=lambda s: modes.append(s.home.stat().st_mode))
    assert stat.S_IMODE(modes[0]) == 0o700
    assert ran.exit_code == 0 and ran.installs == 1
    (reply,) = ran.pushed
    assert not reply.has_error(), reply.error
    assert reply.content["m"]["answer"] == 42  # the approved bundle's helper answered
    assert site.marks() == ["approved"]
    assert ran.installed == [site.folder_name()]
    loaded = sys.modules[f"{site.pkg}.client_app"].__file__
    assert loaded is not None and Path(loaded).is_relative_to(ran.state.home)
    assert (planted / site.pkg / "client_app.py").is_file()  # left alone, never imported


@pytest.mark.parametrize(("fab_id", "version"), [
    (FAB_ID, "2.0.0"), ("sitetest/other-app", VERSION), ("sitetest/gate-test-app/x", VERSION)])
def test_run_naming_another_app_is_refused_before_install(
        monkeypatch: pytest.MonkeyPatch, site: Site, fab_id: str, version: str) -> None:
    """The run's fab_id/fab_version are the bundle's own, or nothing is installed or loaded."""
    if fab_id.count("/") == 1:  # the app Flower would load by the run's names
        site.plant(site.home / "apps", site.folder_name(fab_id, version))
    ran = _run_task(monkeypatch, site, fab_id=fab_id, version=version)
    assert ran.installs == 0 and ran.installed == [] and ran.exit_code != 0
    assert f"the run names app {fab_id!r} version {version!r}" in ran.reason
    assert f"is {FAB_ID!r} version {VERSION!r}" in ran.reason
    assert site.marks() == []
    _names_no_site_path(ran.reason, site, ran.state)


def _change(site: Site, app: Path) -> str:
    (app / site.pkg / "client_app.py").write_text(
        f"open({str(site.markers / 'tampered')!r}, 'w').close()\n", encoding="utf-8")
    return f"{site.pkg}/client_app.py changed"


def _add_module(site: Site, app: Path) -> str:
    (app / site.pkg / "extra.py").write_text("x = 1\n", encoding="utf-8")
    return f"{site.pkg}/extra.py added"


def _add_top_module(site: Site, app: Path) -> str:
    (app / "sitecustomize.py").write_text("x = 1\n", encoding="utf-8")
    return "sitecustomize.py added"


def _add_namespace_package(site: Site, app: Path) -> str:
    (app / "other").mkdir()
    return "other added"


def _add_bytecode(site: Site, app: Path) -> str:
    (app / site.pkg / "__pycache__").mkdir()
    (app / site.pkg / "__pycache__" / "client_app.cpython-311.pyc").write_bytes(b"planted")
    return f"{site.pkg}/__pycache__ added"


def _remove_file(site: Site, app: Path) -> str:
    (app / site.pkg / "helper.py").unlink()
    return f"{site.pkg}/helper.py missing"


def _link_file(site: Site, app: Path) -> str:
    (app / site.pkg / "helper.py").unlink()
    (app / site.pkg / "helper.py").symlink_to(app / site.pkg / "server_app.py")
    return f"{site.pkg}/helper.py replaced by another kind of entry"


TAMPERS = [_change, _add_module, _add_top_module, _add_namespace_package, _add_bytecode,
           _remove_file, _link_file]


@pytest.mark.parametrize("tamper", TAMPERS, ids=lambda f: f.__name__.strip("_"))
def test_installed_app_changed_before_load_is_refused(
        monkeypatch: pytest.MonkeyPatch, site: Site, tamper: Callable[[Site, Path], str]) -> None:
    """Any change to the installed app between install and load: refused, nothing imported."""
    said: list[str] = []
    ran = _run_task(monkeypatch, site, after_install=lambda app: said.append(tamper(site, app)))
    assert ran.exit_code != 0 and ran.installs == 1
    reason = ran.reason  # the refusal, in place of Flower's own error reply
    assert "the installed app differs from app bundle sha256" in reason and said[0] in reason
    assert site.marks() == [] and site.pkg not in sys.modules
    _names_no_site_path(reason, site, ran.state)


def test_app_folder_present_before_install_is_refused(
        monkeypatch: pytest.MonkeyPatch, site: Site) -> None:
    """Flower skips installing into an existing folder: one there already is refused."""
    ran = _run_task(monkeypatch, site,
                    before=lambda s: site.plant(s.home / "apps", site.folder_name()))
    assert "its app folder existed before it was installed" in ran.reason
    assert site.marks() == [] and ran.installs == 0
    _names_no_site_path(ran.reason, site, ran.state)


def test_unapproved_bundle_and_broken_policy_replies_name_no_site_path(
        monkeypatch: pytest.MonkeyPatch, site: Site, tmp_path: Path) -> None:
    other = build_fab_from_disk(
        _write_app(tmp_path / "other", site.pkg, site.markers / "unapproved"))
    ran = _run_task(monkeypatch, site, content=other)
    assert f"app bundle sha256 {_sha(other)} is not approved" in ran.reason
    assert ran.installs == 0
    _names_no_site_path(ran.reason, site, ran.state)
    site.policy.write_text('approved-apps = ["not-a-hash"]\n', encoding="utf-8")
    ran = _run_task(monkeypatch, site)
    assert "the site's policy file cannot be used" in ran.reason and ran.installs == 0
    _names_no_site_path(ran.reason, site, ran.state)
    assert site.marks() == []


def test_gate_refuses_to_run_on_a_flower_it_cannot_wrap(monkeypatch: pytest.MonkeyPatch,
                                                        site: Site) -> None:
    def run_clientapp() -> None:  # calls all but the loader
        _ = (flwr_runtime.pull_task_input, flwr_runtime.install_from_fab,
             flwr_runtime.push_message)

    with monkeypatch.context() as patched:
        patched.setattr(flwr_runtime, "run_clientapp", run_clientapp)
        with pytest.raises(RuntimeError, match="get_load_client_app_fn"), gate(site.policy):
            pass
    with monkeypatch.context() as patched:
        patched.setattr(flwr_runtime, "install_from_fab", lambda fab_file: None)
        with pytest.raises(RuntimeError, match="install_dir"), gate(site.policy):
            pass


def test_private_home_is_removed_on_error(site: Site) -> None:
    with pytest.raises(ZeroDivisionError), gate(site.policy) as state:
        assert os.environ["FLWR_HOME"] == str(state.home) and state.home.is_dir()
        (state.home / "apps").mkdir()
        _ = 1 / 0
    assert not state.home.exists() and os.environ["FLWR_HOME"] == str(site.home)


def test_read_bundle_identity_and_bad_members(site: Site) -> None:
    bundle = read_bundle(site.bundle)
    assert (bundle.fab_id, bundle.version) == (FAB_ID, VERSION)
    assert bundle.clientapp == f"{site.pkg}.client_app:app"
    assert set(bundle.files) == {"pyproject.toml", *(f"{site.pkg}/{m}.py" for m in (
        "__init__", "helper", "server_app", "client_app"))}
    assert bundle.folders == {site.pkg} and bundle.packages == {site.pkg}
    for name in ("../evil.py", "/abs.py", "a//b.py", "a\\b.py"):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr("pyproject.toml", zipfile.ZipFile(io.BytesIO(site.bundle)).read(
                "pyproject.toml"))
            zf.writestr(name, "x = 1\n")
        with pytest.raises(ValueError, match="not a plain relative path"):
            read_bundle(buf.getvalue())
    with pytest.raises(ValueError, match="zip"):
        read_bundle(b"not a zip")


def test_installed_differences_is_empty_for_a_faithful_copy(tmp_path: Path, site: Site) -> None:
    folder = tmp_path / "installed"
    with zipfile.ZipFile(io.BytesIO(site.bundle)) as zf:
        zf.extractall(folder)
    shutil.rmtree(folder / ".info")
    assert installed_differences(folder, read_bundle(site.bundle)) == []
