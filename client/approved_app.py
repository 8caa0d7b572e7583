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
- :func:`clientapp_main` is Flower's ``flwr-clientapp`` itself with a gate around two of the
  functions it calls: after the task input (message, context, run, bundle) is pulled from
  the SuperNode, the bundle's sha256 is computed from its bytes and checked against the
  policy (read afresh for every task); a bundle the policy does not approve gets an error
  reply (code ``shared.protocol.REFUSED``, its hash in the reason) and is never installed;
  installing is refused for any bundle the gate has not approved (fail closed).

Trusted: the SuperNode, this installed fedadapt and Flower, the policy file. Not protected:
what an approved bundle does (approve only code you have reviewed); a simulation, which has
no bundle.
"""

from __future__ import annotations

import hashlib
import io
import os
import shlex
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

from client.policy import POLICY_ENV

RULE = "approved-apps"


class AppRefused(Exception):
    """The task's app bundle is not approved by the site's policy; the message says why."""


@dataclass(frozen=True)
class Verdict:
    """Whether a bundle may run at this site, its sha256, and the reason when it may not."""

    approved: bool
    sha256: str
    reason: str = ""
    why: str = ""  # the reason without the "[site NAME] refused by policy rule" prefix


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
        The hash the bundle came with (Flower's ``fab.hash_str``): it names the folder Flower
        loads the app from, so it must be the content's own hash.
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
        hash is not among ``approved-apps`` (an empty list approves any bundle).
    """
    from client.policy import PolicyError, read_policy

    digest = hashlib.sha256(content).hexdigest()
    where = policy_path if policy_path is not None else node_policy

    def refuse(why: str) -> Verdict:
        return Verdict(False, digest, f"[site {site}] refused by policy rule '{RULE}': {why}",
                       why)

    if where is None or not str(where).strip():
        return refuse(f"app bundle sha256 {digest} cannot be checked: the site's executor has "
                      "no policy file (fedadapt site-exec --policy FILE)")
    try:
        policy = read_policy(where)
    except PolicyError as err:
        return refuse(f"app bundle sha256 {digest} cannot be checked: {err}")
    if stated_hash.strip().lower() != digest:
        return refuse(f"app bundle sha256 {digest} arrived stated as {stated_hash!r}; a bundle "
                      "must be named by its own hash")
    if policy.approved_apps and digest not in policy.approved_apps:
        return refuse(f"app bundle sha256 {digest} is not approved; review it and add the "
                      f"hash to approved-apps in {policy.path}")
    return Verdict(True, digest)


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


def _bundle_packages(content: bytes) -> set[str]:
    """Top-level modules and packages a bundle provides (``client``, ``server``, ...)."""
    with zipfile.ZipFile(io.BytesIO(content)) as zf:
        tops = {name.split("/", 1)[0] for name in zf.namelist()}
    return {t.removesuffix(".py") for t in tops if not t.startswith(".") and t != "pyproject.toml"}


def _forget_modules(names: set[str]) -> None:
    """Forget modules imported under the bundle's package names (the checker's own ``client``).

    Flower then imports the approved bundle's code, not the site's installed copy of it.
    """
    for mod in [m for m in sys.modules if m.split(".", 1)[0] in names]:
        del sys.modules[mod]


@contextmanager
def gate(policy_path: str | Path | None) -> Iterator[list[str]]:
    """Route Flower's ClientApp process through the approval check; yield the approved hashes.

    Flower's ``run_clientapp`` pulls the task input, installs the bundle and loads it in one
    function, with no hook in between. Rather than a hand-written copy of it (heartbeats,
    exit handling, error replies, dependency installation), two module-level functions it
    calls are wrapped for the duration: ``pull_task_input`` (checks the pulled bundle; on
    refusal pushes the REFUSED reply and raises) and ``install_from_fab`` (installs only a
    bundle the check approved, so a Flower that bypassed the first wrapper fails closed).
    """
    from flwr.supercore import log
    from flwr.supernode.runtime import run_clientapp as flwr_runtime

    pull: Callable[..., Any] = flwr_runtime.pull_task_input
    install: Callable[..., Any] = flwr_runtime.install_from_fab
    needed = {"pull_task_input", "install_from_fab"}
    if not needed <= set(flwr_runtime.run_clientapp.__code__.co_names):
        raise RuntimeError("this Flower's run_clientapp no longer calls pull_task_input and "
                           "install_from_fab: the app check cannot be placed; refusing to run")
    approved: list[str] = []

    def checked_pull(client: Any) -> Any:
        message, context, run, fab = pull(client)
        node_policy = context.node_config.get("policy")
        if (policy_path is not None and node_policy
                and Path(str(node_policy)).expanduser().resolve()
                != Path(policy_path).expanduser().resolve()):
            log(WARNING, "[fedadapt] node_config names policy %s; the executor's --policy %s "
                "is the one applied", node_policy, policy_path)
        verdict = check_bundle(fab.content, fab.hash_str, _site_name(context), policy_path,
                               str(node_policy) if node_policy else None)
        if not verdict.approved:
            log(ERROR, "[fedadapt] %s", verdict.reason)
            try:
                flwr_runtime.push_message(client, _refusal(message, context, verdict), context)
            except Exception as err:  # still refuse; the coordinator then sees no reply
                log(ERROR, "[fedadapt] could not send the refusal: %s", err)
            raise AppRefused(verdict.reason)
        log(INFO, "[fedadapt] app bundle sha256 %s approved by the site's policy",
            verdict.sha256)
        approved.append(verdict.sha256)
        _forget_modules(_bundle_packages(fab.content))
        return message, context, run, fab

    def checked_install(fab_file: Any, *args: Any, **kwargs: Any) -> Any:
        content = fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes()
        digest = hashlib.sha256(content).hexdigest()
        if digest not in approved:
            raise AppRefused(f"refused to install app bundle sha256 {digest}: it was not "
                             "checked against the site's policy")
        return install(fab_file, *args, **kwargs)

    flwr_runtime.pull_task_input = checked_pull
    flwr_runtime.install_from_fab = checked_install
    try:
        yield approved
    finally:
        flwr_runtime.pull_task_input = pull
        flwr_runtime.install_from_fab = install


def clientapp_main() -> None:
    """``flwr-clientapp`` (same arguments) behind the approval check; policy from the env."""
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    with gate(os.environ.get(POLICY_ENV) or None):
        flwr_clientapp()


def _launcher(folder: Path) -> Path:
    """An executable that runs :func:`clientapp_main` with this Python, this fedadapt.

    Flower's subprocess executor starts a task as ONE command followed by its arguments. ``-I``
    keeps the working directory and PYTHON* variables out of the import path, so the checker
    imported is the installed one.
    """
    path = folder / "fedadapt-site-clientapp"
    code = "from client.approved_app import clientapp_main; clientapp_main()"
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
