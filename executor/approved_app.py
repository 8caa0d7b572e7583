"""The site runs only the app bundles its policy approves: checked before any shipped code runs.

The coordinator ships its code to the sites as a Flower app bundle (FAB, a zip). Flower's own
check (``flower-supernode --trusted-entities``) needs Flower Hub signatures, which the bundles
of a private federation (``flwr run .``) do not carry. Here the site pins bundles by sha256
in its policy (``approved-apps``, :mod:`client.policy`) and checks every task's bundle in a
process of its own, with this installed code, before the bundle is unpacked or imported:

- The SuperNode runs with ``--isolation process``: it starts no executor of its own.
- ``fedadapt site-exec --policy FILE`` (:func:`site_exec`) is Flower's SuperExec loop
  (``run_superexec``) with one change: a ClientApp task starts :func:`clientapp_main`
  instead of ``flwr-clientapp``.
- :func:`clientapp_main` is Flower's ``flwr-clientapp`` itself with a gate (:func:`gate`)
  around four of the functions it calls. The approved bytes are what is checked, and the
  approved code is what runs:

  1. ``pull_task_input``: the bundle's sha256, computed from its bytes, must be approved by
     the policy (read afresh for every task), and the run's ``fab_id``/``fab_version`` must
     be the bundle's own (its ``pyproject.toml``); otherwise the coordinator gets an error
     reply (code ``shared.protocol.REFUSED``) and nothing is installed.
  2. ``install_from_fab``: the checked bytes, and only those, are installed into a Flower
     home created empty for this process (mode 0700, removed when it ends): no app folder
     planted earlier under a hash prefix can be picked up in their place.
  3. ``get_load_client_app_fn``: right before the ClientApp is imported, the installed
     folder must hold exactly the bundle's files with the same bytes (nothing added, changed
     or missing), and the ClientApp's package must resolve to that folder; it is then loaded
     from that folder only, whatever the run names.
  4. ``push_message``: after a refusal at step 2 or 3 the reply sent is the refusal.

  A reply names no path of the site; the site's log has the policy file and the folder.

Trusted: the SuperNode, this installed fedadapt and Flower, the policy file, the site's
account (it can change its own temporary folders). Not protected: what an approved bundle does
(approve only code you have reviewed); a simulation, which has no bundle.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import io
import os
import re
import shlex
import shutil
import stat
import sys
import tempfile
import tomllib
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any, NoReturn

from client.policy import POLICY_ENV
from shared.errors import FedadaptError

RULE = "approved-apps"
# The functions of Flower's run_clientapp the gate wraps; it refuses to run if one is not called.
WRAPPED = ("pull_task_input", "install_from_fab", "get_load_client_app_fn", "push_message")
# Publisher, name and version name the app's folder: no separator, no "." or "..".
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")


class AppRefused(FedadaptError):
    """The task's app bundle is not approved by the site's policy; the message says why."""


@dataclass(frozen=True)
class Verdict:
    """Whether a bundle may run at this site, its sha256, and the reason when it may not.

    ``reason`` and ``why`` are sent to the coordinator and name no path of the site; ``note``
    (the policy file, the app's folder) goes to the site's own log only.
    """

    approved: bool
    sha256: str
    reason: str = ""
    why: str = ""  # the reason without the "[site NAME] refused by policy rule" prefix
    note: str = ""


def _refused(site: str, digest: str, why: str, note: str = "") -> Verdict:
    return Verdict(False, digest, f"[site {site}] refused by policy rule '{RULE}': {why}", why,
                   note)


def _logged(verdict: Verdict) -> str:
    """The site's log line of a refusal: the reason, and the local detail."""
    return f"{verdict.reason} ({verdict.note})" if verdict.note else verdict.reason


def bundle_hash(project_dir: str | Path) -> str:
    """The sha256 of the bundle ``flwr run PROJECT_DIR`` sends, built with Flower's own code."""
    from flwr.cli.build import build_fab_from_disk

    project = Path(project_dir).expanduser().resolve()
    if not (project / "pyproject.toml").is_file():
        raise ValueError(f"{project} has no pyproject.toml: name a Flower app's folder")
    return hashlib.sha256(build_fab_from_disk(project)).hexdigest()


def check_bundle(content: bytes, stated_hash: str, site: str, policy_path: str | Path | None,
                 node_policy: str | None = None) -> Verdict:
    """Check a bundle's bytes against the site's policy before anything of it is used.

    Parameters
    ----------
    content : bytes
        The bundle as pulled from the SuperNode.
    stated_hash : str
        The hash the bundle came with (Flower's ``fab.hash_str``): Flower passes it on to name
        the app's folder, so it must be the content's own hash, exactly.
    site : str
        The site's name, for the reason.
    policy_path : str or Path, optional
        The policy the site's executor was started with (authoritative).
    node_policy : str, optional
        The ``policy`` of the SuperNode's node_config, used only when ``policy_path`` is None.

    Returns
    -------
    Verdict
        Refused when the policy cannot be read, the stated hash is not the content's, or the
        hash is not among ``approved-apps`` (an empty list approves any bundle). The reason
        names no path of the site; the verdict's ``note`` does, for the site's log.
    """
    from client.policy import PolicyError, read_policy

    digest = hashlib.sha256(content).hexdigest()
    where = policy_path if policy_path is not None else node_policy
    if where is None or not str(where).strip():
        return _refused(site, digest, f"app bundle sha256 {digest} cannot be checked: the "
                        "site's executor has no policy file (fedadapt site-exec --policy FILE)")
    try:
        policy = read_policy(where)
    except PolicyError as err:
        return _refused(site, digest, f"app bundle sha256 {digest} cannot be checked: the "
                        "site's policy file cannot be used (the site's log says why)", str(err))
    if stated_hash != digest:
        return _refused(site, digest, f"app bundle sha256 {digest} arrived stated as "
                        f"{stated_hash!r}; a bundle must be named by its own hash")
    if policy.approved_apps and digest not in policy.approved_apps:
        return _refused(site, digest, f"app bundle sha256 {digest} is not approved; review it "
                        "and add its hash to the site's approved-apps", f"policy {policy.path}")
    return Verdict(True, digest)


@dataclass(frozen=True)
class Bundle:
    """An app bundle as its own bytes describe it: identity, ClientApp, files."""

    fab_id: str  # "publisher/name"
    version: str
    clientapp: str  # the ClientApp's reference, "module:attribute"
    files: Mapping[str, bytes]  # every file but Flower's manifest (.info/), by its POSIX path
    folders: frozenset[str]

    @property
    def packages(self) -> set[str]:
        """Top-level modules and packages the bundle provides (``client``, ``server``, ...)."""
        tops = {name.split("/", 1)[0] for name in [*self.files, *self.folders]}
        return {t.removesuffix(".py") for t in tops
                if not t.startswith(".") and t != "pyproject.toml"}


def read_bundle(content: bytes) -> Bundle:
    """Read an app bundle's identity and files from its bytes, as Flower installs them.

    Parameters
    ----------
    content : bytes
        The bundle (a zip).

    Returns
    -------
    Bundle
        Its ``fab_id`` (``[tool.flwr.app] publisher`` / ``[project] name``), ``version``,
        ClientApp reference and files.

    Raises
    ------
    ValueError
        If it is not a zip, a member is not named by a plain relative path or is named twice,
        or its pyproject.toml does not name the app. The message names no path of the site.
    """
    files: dict[str, bytes] = {}
    folders: set[str] = set()
    named: set[str] = set()
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as zf:
            for info in zf.infolist():
                name = info.filename.removesuffix("/") if info.is_dir() else info.filename
                parts = name.split("/")
                if "\\" in name or any(part in ("", ".", "..") for part in parts):
                    raise ValueError(f"member {info.filename!r} is not a plain relative path")
                if parts[0] == ".info":
                    continue  # Flower's manifest, checked and removed by its installer
                if name in named:
                    raise ValueError(f"member {name!r} is in it twice")
                named.add(name)
                if info.is_dir():
                    folders.add(name)
                else:
                    files[name] = zf.read(info)
                folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
    except (zipfile.BadZipFile, EOFError, NotImplementedError) as err:
        raise ValueError(f"it cannot be read as a zip ({type(err).__name__})") from None
    if files.keys() & folders:
        raise ValueError("a member is both a file and a folder")
    try:
        config = tomllib.loads(files["pyproject.toml"].decode("utf-8"))
        app = config["tool"]["flwr"]["app"]
        publisher, clientapp = app["publisher"], app["components"]["clientapp"]
        name, version = config["project"]["name"], config["project"]["version"]
    except (KeyError, TypeError, ValueError):  # also a TOML or UTF-8 error
        raise ValueError("its pyproject.toml does not name the app's publisher, name, version "
                         "and ClientApp") from None
    if not all(isinstance(v, str) and _NAME.fullmatch(v) for v in (publisher, name, version)) \
            or not isinstance(clientapp, str):
        raise ValueError("its pyproject.toml names the app with characters a folder name "
                         "cannot carry")
    return Bundle(f"{publisher}/{name}", version, clientapp, files, frozenset(folders))


def installed_differences(folder: Path, bundle: Bundle) -> list[str]:
    """How an installed app's folder differs from its bundle; empty when it is the bundle.

    Every file of the bundle must be there with the same bytes, and nothing else: any file,
    folder or link added could be imported in place of the bundle's code. Entries are named by
    their path inside the app, never by the site's folder.

    Parameters
    ----------
    folder : Path
        The installed app.
    bundle : Bundle
        The approved bundle it was installed from.

    Returns
    -------
    list of str
        One line per difference (``client/x.py changed``, ``evil.py added``), sorted.
    """
    found: list[str] = []
    if folder.is_symlink() or not folder.is_dir():
        return ["the app's folder is not a folder"]
    seen: set[str] = set()

    def unreadable(err: OSError) -> None:
        found.append(f"a folder cannot be read ({err.strerror})")

    for root, dirs, names in os.walk(folder, onerror=unreadable):  # links are not followed
        for name in [*dirs, *names]:
            path = Path(root, name)
            rel = path.relative_to(folder).as_posix()
            seen.add(rel)
            if rel not in bundle.files and rel not in bundle.folders:
                found.append(f"{rel} added")
                continue
            try:
                mode = path.lstat().st_mode
                if stat.S_ISDIR(mode) != (rel in bundle.folders) or not (
                        stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                    found.append(f"{rel} replaced by another kind of entry")
                elif rel in bundle.files and path.read_bytes() != bundle.files[rel]:
                    found.append(f"{rel} changed")
            except OSError as err:
                found.append(f"{rel} cannot be read ({err.strerror})")
    found += [f"{rel} missing" for rel in bundle.files.keys() - seen]
    return sorted(found)


def _import_origin(folder: Path, clientapp: str) -> str:
    """Where the ClientApp's top-level package would be imported from, if not from ``folder``.

    Asked of the import system's finders as Flower's loader will ask them, with ``folder``
    first on the import path, and regardless of modules already imported (the site's own
    ``client``). Returns "" when the package resolves to ``folder`` only (not a namespace
    package spanning other folders, not another finder's module).
    """
    top = clientapp.partition(":")[0].split(".", 1)[0]
    entry = str(folder)
    sys.path.insert(0, entry)
    importlib.invalidate_caches()
    try:
        spec = None
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            if find_spec is None:
                return f"finder {finder!r} cannot be asked"
            if (spec := find_spec(top, None)) is not None:
                break
    except (ImportError, ValueError) as err:
        return f"{top!r} cannot be found ({err})"
    finally:
        sys.path.remove(entry)  # put back first right before the approved app is loaded
    if spec is None:
        return f"{top!r} is not found"
    places = [*([spec.origin] if spec.has_location and spec.origin else []),
              *(spec.submodule_search_locations or [])]
    if not places:
        return f"{top!r} has no location"
    root = folder.resolve()
    return ", ".join(p for p in places if not Path(p).resolve().is_relative_to(root))


def _refusal(message: Any, context: Any, verdict: Verdict) -> Any:
    """The refusal reply, built by the site's one reply builder and audited like any other."""
    from client.audit_log import audited
    from client.egress import error_reply
    from client.policy import PolicyRefusal
    from client.site import SiteConfigError, resolve_site
    from shared import protocol

    phase = {protocol.STATS: "stats", protocol.TRAIN: "train", protocol.ADAPT: "adapt",
             protocol.EVALUATE: "evaluate"}.get(message.metadata.message_type, "task")
    try:
        site = resolve_site(context.node_config, context.run_config)
    except SiteConfigError:
        site = None  # audited() says the reply leaves unaudited
    reply = error_reply(message, PolicyRefusal(RULE, verdict.why), phase, _site_name(context))
    return audited(message, reply, phase, site)


def _site_name(context: Any) -> str:
    name = context.node_config.get("site-name") if context is not None else None
    return str(name) if name else f"node-{getattr(context, 'node_id', '?')}"


def _forget_modules(names: set[str]) -> None:
    """Forget modules imported under the bundle's package names (the checker's own ``client``).

    Flower then imports the approved bundle's code, not the site's installed copy of it.
    """
    for mod in [m for m in sys.modules if m.split(".", 1)[0] in names]:
        del sys.modules[mod]


def _check_task(content: bytes, digest: str, run: Any, site: str) -> tuple[Verdict, Bundle | None]:
    """The approved bundle must be the app the run names: Flower loads by the run's names."""
    try:
        bundle = read_bundle(content)
    except ValueError as err:
        return _refused(site, digest, f"app bundle sha256 {digest} cannot be read: {err}"), None
    named = (str(getattr(run, "fab_id", "")), str(getattr(run, "fab_version", "")))
    if named != (bundle.fab_id, bundle.version):
        return _refused(site, digest, f"the run names app {named[0]!r} version {named[1]!r}, "
                        f"but its app bundle sha256 {digest} is {bundle.fab_id!r} version "
                        f"{bundle.version!r}"), None
    return Verdict(True, digest), bundle


def _check_flower(flwr_runtime: Any) -> None:
    """Refuse to run on a Flower whose run_clientapp the gate cannot wrap as written."""
    missing = [name for name in WRAPPED
               if name not in flwr_runtime.run_clientapp.__code__.co_names]
    params = {"install_from_fab": {"install_dir", "skip_prompt"},
              "get_load_client_app_fn": {"default_app_ref", "app_path", "multi_app"}}
    for name, needed in params.items():
        if not needed <= set(inspect.signature(getattr(flwr_runtime, name)).parameters):
            missing.append(f"{name}({', '.join(sorted(needed))})")
    if missing:
        raise RuntimeError(f"this Flower's run_clientapp no longer calls {', '.join(missing)}: "
                           "the app check cannot be placed; refusing to run")


@dataclass
class ApprovedTask:
    """The one task of a ClientApp process, as the gate approved it."""

    message: Any
    context: Any
    content: bytes  # the bytes that were hashed: the ones installed
    sha256: str
    bundle: Bundle
    installed: Path | None = None


@dataclass
class GateState:
    """A ClientApp process's gate: its private Flower home, its task, its refusal reply."""

    home: Path
    approved: list[str] = field(default_factory=list)
    task: ApprovedTask | None = None
    refusal: Any = None  # sent in place of Flower's own error reply


@contextmanager
def gate(policy_path: str | Path | None) -> Iterator[GateState]:
    """Route Flower's ClientApp process through the approval check; yield the gate's state.

    Flower's ``run_clientapp`` pulls the task input, installs the bundle and loads it in one
    function, with no hook in between. Rather than a hand-written copy of it (heartbeats,
    exit handling, error replies, dependency installation), four module-level functions it
    calls are wrapped for the duration (see the module's description), and ``FLWR_HOME`` is
    a folder created empty for this process, removed on the way out (also on error).

    Parameters
    ----------
    policy_path : str or Path, optional
        The site's policy (None: the SuperNode's node_config ``policy``, else refuse all).

    Yields
    ------
    GateState
        The private home, the approved hashes, the task and any refusal reply.

    Raises
    ------
    RuntimeError
        If this Flower's ``run_clientapp`` no longer calls the wrapped functions as expected.
    """
    from flwr.common.constant import APP_DIR, FAB_HASH_TRUNCATION, FLWR_HOME
    from flwr.supercore import log
    from flwr.supernode.runtime import run_clientapp as flwr_runtime

    _check_flower(flwr_runtime)
    pull: Callable[..., Any] = flwr_runtime.pull_task_input
    install: Callable[..., Any] = flwr_runtime.install_from_fab
    get_loader: Callable[..., Any] = flwr_runtime.get_load_client_app_fn
    push: Callable[..., Any] = flwr_runtime.push_message

    def refuse(why: str, note: str = "") -> NoReturn:
        """Refuse the task: log it, keep the refusal reply for the coordinator, raise."""
        task = state.task
        verdict = _refused(_site_name(task.context if task else None),
                           task.sha256 if task else "", why, note)
        log(ERROR, "[fedadapt] %s", _logged(verdict))
        if task is not None and state.refusal is None:
            try:
                state.refusal = _refusal(task.message, task.context, verdict)
            except Exception as err:  # still refuse; the coordinator gets Flower's error
                log(ERROR, "[fedadapt] could not build the refusal: %s", err)
        raise AppRefused(verdict.reason)

    def checked_pull(client: Any) -> Any:
        message, context, run, fab = pull(client)
        node_policy = context.node_config.get("policy")
        if (policy_path is not None and node_policy
                and Path(str(node_policy)).expanduser().resolve()
                != Path(policy_path).expanduser().resolve()):
            log(WARNING, "[fedadapt] node_config names policy %s; the executor's --policy %s "
                "is the one applied", node_policy, policy_path)
        site = _site_name(context)
        verdict = check_bundle(fab.content, fab.hash_str, site, policy_path,
                               str(node_policy) if node_policy else None)
        bundle = None
        if verdict.approved:
            verdict, bundle = _check_task(fab.content, verdict.sha256, run, site)
        if bundle is None:
            log(ERROR, "[fedadapt] %s", _logged(verdict))
            try:  # Flower sends no reply for a task whose input it did not get
                push(client, _refusal(message, context, verdict), context)
            except Exception as err:  # still refuse; the coordinator then sees no reply
                log(ERROR, "[fedadapt] could not send the refusal: %s", err)
            raise AppRefused(verdict.reason)
        log(INFO, "[fedadapt] app bundle sha256 %s (%s %s) approved by the site's policy",
            verdict.sha256, bundle.fab_id, bundle.version)
        state.task = ApprovedTask(message, context, fab.content, verdict.sha256, bundle)
        state.approved.append(verdict.sha256)
        return message, context, run, fab

    def checked_install(fab_file: Any, *_args: Any, **_kwargs: Any) -> Path:
        task = state.task
        content = fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes()
        digest = hashlib.sha256(content).hexdigest()
        if task is None or digest != task.sha256:
            refuse(f"refused to install app bundle sha256 {digest}: it was not checked "
                   "against the site's policy")
        if task.installed is not None:
            return task.installed
        publisher, name = task.bundle.fab_id.split("/")
        folder = (state.home / APP_DIR / f"{publisher}.{name}.{task.bundle.version}."
                  f"{digest[:FAB_HASH_TRUNCATION]}")
        if os.path.lexists(folder):  # Flower would skip installing and load what is there
            refuse(f"app bundle sha256 {digest}: its app folder existed before it was "
                   "installed", f"folder {folder}")
        # The checked bytes, into this process's home, whatever the caller asked.
        installed = Path(install(task.content, install_dir=state.home, skip_prompt=True))
        if installed != folder:
            refuse(f"app bundle sha256 {digest} was not installed where it is loaded "
                   "from", f"installed in {installed}, expected {folder}")
        task.installed = folder
        return folder

    def checked_get_loader(*_args: Any, **_kwargs: Any) -> Callable[[str, str, str], Any]:
        def load(fab_id: str, fab_version: str, fab_hash: str) -> Any:
            task = state.task
            if task is None or task.installed is None:
                refuse("refused to load an app that was not checked and installed here")
            digest, bundle, folder = task.sha256, task.bundle, task.installed
            if (fab_id, fab_version, fab_hash) != (bundle.fab_id, bundle.version, digest):
                refuse(f"refused to load app {fab_id!r} version {fab_version!r} "
                       f"(bundle {fab_hash!r}): the approved app bundle sha256 {digest} is "
                       f"{bundle.fab_id!r} version {bundle.version!r}")
            differences = installed_differences(folder, bundle)
            if differences:
                more = f" and {len(differences) - 3} more" if len(differences) > 3 else ""
                refuse(f"the installed app differs from app bundle sha256 {digest}: "
                       f"{'; '.join(differences[:3])}{more}", f"folder {folder}")
            elsewhere = _import_origin(folder, bundle.clientapp)
            if elsewhere:
                refuse(f"the ClientApp {bundle.clientapp!r} would not be imported from app "
                       f"bundle sha256 {digest}", f"it resolves to {elsewhere}")
            log(INFO, "[fedadapt] loading the ClientApp of app bundle sha256 %s from its "
                "verified copy %s", digest, folder)
            # Nothing refused from here on: the site's modules of the bundle's names go, and
            # the verified folder is first on the import path and the only one loaded from,
            # whatever the caller asked.
            _forget_modules(bundle.packages)
            while str(folder) in sys.path:
                sys.path.remove(str(folder))
            sys.path.insert(0, str(folder))
            loader = get_loader(default_app_ref="", app_path=str(folder), multi_app=True)
            return loader(fab_id, fab_version, fab_hash)

        return load

    def checked_push(client: Any, message: Any, context: Any) -> Any:
        return push(client, state.refusal if state.refusal is not None else message, context)

    # A Flower home of this process only, created empty (mode 0700): no app folder can have
    # been planted in it.
    state = GateState(Path(tempfile.mkdtemp(prefix="fedadapt-clientapp-")))
    saved_home = os.environ.get(FLWR_HOME)
    try:
        os.environ[FLWR_HOME] = str(state.home)
        flwr_runtime.pull_task_input = checked_pull
        flwr_runtime.install_from_fab = checked_install
        flwr_runtime.get_load_client_app_fn = checked_get_loader
        flwr_runtime.push_message = checked_push
        yield state
    finally:
        flwr_runtime.pull_task_input = pull
        flwr_runtime.install_from_fab = install
        flwr_runtime.get_load_client_app_fn = get_loader
        flwr_runtime.push_message = push
        if saved_home is None:
            os.environ.pop(FLWR_HOME, None)
        else:
            os.environ[FLWR_HOME] = saved_home
        shutil.rmtree(state.home, ignore_errors=True)


def clientapp_main() -> None:
    """``flwr-clientapp`` (same arguments) behind the approval check; policy from the env."""
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    from shared.logs import quiet_own_errors

    quiet_own_errors()  # a refusal is one line, not Flower's traceback of AppRefused
    with gate(os.environ.get(POLICY_ENV) or None):
        flwr_clientapp()


def _launcher(folder: Path) -> Path:
    """An executable that runs :func:`clientapp_main` with this Python, this fedadapt.

    Flower's subprocess executor starts a task as ONE command followed by its arguments. ``-I``
    keeps the working directory and PYTHON* variables out of the import path, so the checker
    imported is the installed one.
    """
    path = folder / "fedadapt-site-clientapp"
    code = "from executor.approved_app import clientapp_main; clientapp_main()"
    path.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -I -c '
                    f'{shlex.quote(code)} "$@"\n', encoding="utf-8")
    path.chmod(0o700)
    return path


def _route_clientapp_tasks(command: Path) -> None:
    """Make this process's SuperExec start ``command`` for ClientApp tasks, and take no other.

    Flower's subprocess executor reads the command of each task type from
    ``flwr.supercore.constant.TASK_TYPE_TO_COMMAND`` when it launches; SuperExec acquires the
    task types its plugin lists. Checked, so that a Flower that changed either fails here.
    """
    from flwr.supercore import constant
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor import subprocess_executor
    from flwr.supercore.superexec.plugin import base_exec_plugin

    if subprocess_executor.TASK_TYPE_TO_COMMAND is not constant.TASK_TYPE_TO_COMMAND or \
            "supported_task_types" not in vars(base_exec_plugin.AutoExecPlugin):
        raise RuntimeError("this Flower's SuperExec launches tasks differently: the app check "
                           "cannot be placed; refusing to run")
    constant.TASK_TYPE_TO_COMMAND[TaskType.CLIENT_APP] = str(command)
    base_exec_plugin.AutoExecPlugin.supported_task_types = frozenset({TaskType.CLIENT_APP})


def site_exec(policy: str | Path, runtime_api_address: str, *, insecure: bool = True,
              root_certificates: str | None = None, parent_pid: int | None = None) -> None:
    """Run the site's executor: Flower's SuperExec, each ClientApp task checked first.

    Parameters
    ----------
    policy : str or Path
        The site's policy file (read now, to fail early, and again for every task).
    runtime_api_address : str
        The SuperNode's runtime API (``127.0.0.1:PORT``, its ``--port``).
    insecure : bool
        The runtime API without TLS (the SuperNode's default, on loopback).
    root_certificates : str, optional
        CA of the runtime API's certificate (a SuperNode started with ``--ssl-certfile``).
    parent_pid : int, optional
        Stop when this process ends.

    Raises
    ------
    client.policy.PolicyError
        If the policy file cannot be used.
    """
    from flwr.supercore import log
    from flwr.supercore.superexec.run_superexec import run_superexec

    from client.policy import read_policy

    rules = read_policy(policy)
    os.environ[POLICY_ENV] = str(rules.path)
    log(INFO, "[fedadapt] site executor: every app bundle is checked against %s (%s)",
        rules.path, rules.describe()[0])
    folder = Path(tempfile.mkdtemp(prefix="fedadapt-site-exec-"))
    try:
        _route_clientapp_tasks(_launcher(folder))
        run_superexec(runtime_api_address=runtime_api_address, insecure=insecure,
                      root_certificates_path=root_certificates, parent_pid=parent_pid,
                      runtime_dependency_install=False)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
