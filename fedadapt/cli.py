"""The ``fedadapt`` command: parses arguments and hands each job to the package that owns it."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.text import Text

from bench.options import BenchOptions
from fedadapt.console import (
    console,
    explain,
    fail,
    say,
    stops_its_processes,
    user_command,
)
from fedadapt.run_options import with_run_settings
from shared.settings import RunSettings
from simulations.generator import ROLES

app = typer.Typer(
    help="fedadapt: hospitals learn one risk model together, then each makes it its own.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        print(f"fedadapt {version('fedadapt')} (flwr {version('flwr')})")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True,
        help="Print fedadapt's version (and Flower's) and exit.")] = False,
) -> None:
    """Fedadapt: hospitals learn one risk model together, then each makes it its own."""


# Set by the command itself, from --data and --out: not options of simulate / deploy-local.
SET_BY_COMMAND = frozenset({"sites-manifest", "schema", "out", "expected-sites"})
DATA_HELP = "'synthetic' (generated hospitals), 'heart:DIR' (UCI files) or a folder with sites.toml"
SITES_HELP = escape(f"Generated hospitals (--data synthetic only). [default: {ROLES}]")
RESULT_COLUMNS = ("run", "rep.", "rows", "pos.", "local", "source", "adapted",
                  "adapted - local [95 %]", "model")
DEPLOY_SITES = 4  # every deployed site is a SuperNode with its own processes: fewer by default


def _out_dir(out: Path) -> Path:
    """An output folder the command may write (created if missing); never an existing file."""
    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file: name a folder (it is created if missing)")
    above = next((p for p in out.absolute().parents if p.exists()), None)
    if above is not None and not above.is_dir():
        fail(f"--out {out}: {above} is a file, so the folder cannot be created there")
    return out


def _sites(data: str, sites: int | None, default: int = ROLES) -> int:
    if sites is not None and sites < 1:
        fail(f"--sites {sites}: generate at least 1 site")
    if sites is not None and data != "synthetic":
        fail(f"--sites sets the number of generated hospitals; --data {data} brings its own "
             "sites: drop --sites")
    return default if sites is None else sites


@app.command()
@user_command
@with_run_settings(exclude=SET_BY_COMMAND)
def simulate(
    settings: RunSettings,
    given: set[str],
    data: Annotated[str, typer.Option(help=DATA_HELP)] = "synthetic",
    sites: Annotated[int | None, typer.Option(help=SITES_HELP, show_default=False)] = None,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("fedadapt-out"),
    timeout: Annotated[float, typer.Option(help="Stop the run after this many seconds.")] = 3600,
    # Where the simulation runs, not what the federated run computes: an option of this
    # command, not a run setting (shared.settings.RunSettings), so it never reaches the
    # ServerApp, the sites or `flwr run .`; Flower 1.42's federation config has no Ray address.
    ray_address: Annotated[str | None, typer.Option(
        help="Run the virtual sites on the running Ray cluster whose head is HOST:PORT "
             "(this machine must be one of its nodes); fedadapt never stops it. By default "
             "it starts and stops a Ray instance of its own.",
        show_default=False)] = None,
) -> None:
    """Run the whole pipeline over virtual hospitals in Flower's simulation engine."""
    from fedadapt.progress import RunProgress
    from simulations.simulate import simulate as run

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    n_sites = _sites(data, sites)
    progress = RunProgress(settings.repeats, settings.num_server_rounds)
    resume = ("the same command resumes it from its last round" if settings.resume else "")
    with stops_its_processes("the simulation", out / "checkpoint", resume), progress, \
            _quiet("client"):
        report = run(data, _out_dir(out), settings, n_sites=n_sites, on_event=progress.update,
                     timeout=timeout, ray_address=ray_address)
    _print_results(report, out)
    if cluster := report.get("config", {}).get("ray-cluster"):
        say(f"ran on the Ray cluster at {cluster['address']} ({cluster['nodes']} nodes, "
            f"{cluster['cpus']:g} CPUs); it keeps running")


@app.command("deploy-local")
@user_command
@with_run_settings(exclude=SET_BY_COMMAND, defaults={"node-wait-timeout": 120.0,
                                                    "dp": "record"})
def deploy_local(
    settings: RunSettings,
    given: set[str],
    data: Annotated[str, typer.Option(help=DATA_HELP)] = "synthetic",
    sites: Annotated[int | None, typer.Option(help=escape(
        f"Generated hospitals (--data synthetic only); fewer than simulate's {ROLES}: each is "
        f"a SuperNode with processes of its own. [default: {DEPLOY_SITES}]"),
        show_default=False)] = None,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("fedadapt-deploy"),
    timeout: Annotated[float, typer.Option(help="Stop the run after this many seconds.")] = 3600,
    site_policy: Annotated[Path | None, typer.Option(
        help="Start every site with --isolation process and `fedadapt site-exec --policy "
             "FILE`: it runs only the app bundles the policy approves.",
        show_default=False)] = None,
) -> None:
    """Run the federation for real on this machine: TLS, authenticated SuperNodes, report."""
    from deploy.local import deploy_local as run
    from fedadapt.progress import RunProgress
    from simulations.datasets import sites_for_run

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    n_sites = _sites(data, sites, DEPLOY_SITES)
    out = _out_dir(out)

    def show_logs(logs: dict[str, Path]) -> None:
        say("logs: " + "; ".join(f"{k}: {v}" for k, v in logs.items())
            + f"; run: {out.resolve() / 'logs' / 'flwr-run.log'}")

    progress = RunProgress(settings.repeats, settings.num_server_rounds, pooled=False)
    resume = ("the same command resumes it from its last round" if settings.resume else "")
    with stops_its_processes("the deployment", out / "checkpoint", resume), progress, \
            _quiet("client"):
        manifest = sites_for_run(data, out, n_sites, settings)
        report = run(manifest, out, settings, data=data, on_event=progress.update,
                     on_logs=show_logs, timeout=timeout, site_policy=site_policy)
    _print_results(report, out)
    _print_kept_results(report, out / "sites")
    d = report["deployment"]
    mean = d["mean_round_latency_s"]
    say(f"deployment: start-up {d['startup_s']:.1f} s, run {d['run_s']:.1f} s"
        + (f", {mean:.2f} s per round" if mean is not None else "")
        + "; TLS on every connection, authenticated SuperNodes")


@app.command()
@user_command
def certs(
    out: Annotated[Path, typer.Option(help="Folder for the CA, SuperLink and site keys.")],
    sites: Annotated[int, typer.Option(help="Number of sites (at least 1).")],
    host: Annotated[list[str] | None, typer.Option(
        help="Name or IP the SuperLink is reached by (repeatable); localhost and 127.0.0.1 "
             "are always included.")] = None,
    names: Annotated[str, typer.Option(
        help="Comma-separated site names (default site-1 ... site-N).")] = "",
    force: Annotated[bool, typer.Option(
        help="Replace existing keys and certificates (sites then need their new keys).")] = False,
) -> None:
    """Make the federation's CA, the SuperLink's TLS certificate and one key pair per site."""
    from server.certs import make_certs

    try:
        files = make_certs(_out_dir(out), sites, host or [], [
            n.strip() for n in names.split(",") if n.strip()] or None, force=force)
    except ValueError as err:
        fail(str(err))
    for path in files.written:
        say(f"wrote {path}")
    for path in files.kept:
        say(("kept ", "yellow"), f"{path} (exists; --force replaces it)")
    if files.guide is not None:
        say(files.guide.read_text(encoding="utf-8"))


@app.command()
@user_command
def gateway(
    listen: Annotated[str, typer.Option(help="HOST:PORT the sites connect to (public).")],
    superlink: Annotated[str, typer.Option(
        help="HOST:PORT of the SuperLink (private: loopback or the coordinator's network).")],
    ca_cert: Annotated[Path, typer.Option(help="The federation's CA certificate.")],
    cert: Annotated[Path, typer.Option(help="TLS certificate for the sites (server.pem).")],
    key: Annotated[Path, typer.Option(help="Its private key (server.key).")],
    max_body_mib: Annotated[int | None, typer.Option(
        help="Largest request body forwarded, MiB (default: server.gateway's MAX_BODY_BYTES).",
        show_default=False)] = None,
) -> None:
    """Serve the sites' only way in: Flower's Fleet API, never its Control API (TLS)."""
    from server.gateway import MAX_BODY_BYTES, serve

    serve(listen, superlink, ca_cert, cert, key,
          max_body_mib if max_body_mib is not None else MAX_BODY_BYTES // 2**20)


@app.command()
@user_command
def predict(
    site_dir: Annotated[Path, typer.Option(help="The site's private folder (site-dir).")],
    input: Annotated[Path, typer.Option(help="New patients (the schema's format).")],
    output: Annotated[Path, typer.Option(help="Where to write one risk per row (CSV).")],
    run: Annotated[str | None, typer.Option(
        help="Use the model of this run (its id, or the start of the model's digest); the "
             "newest by default.", show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option(
        help="Replace --output if it exists (never the input or a file of the site folder).",
    )] = False,
) -> None:
    """Score new patients at a site with the source model and the site's own correction."""
    from client.predict import predict_file

    with _quiet("client"):  # the input's warnings are printed below, once
        summary = predict_file(site_dir, input, output, run=run, overwrite=overwrite)
    say(f"scored {summary.rows} rows into {summary.output} with the source model of "
        f"{summary.model}")
    if not summary.correction_applied:
        say("the site's correction is not applied (its cross-validation found no gain): every "
            "risk is the source model's")
    else:
        say(f"the site's correction is in {summary.corrected_rows} of {summary.rows} risks")
    for reason, rows in summary.fallback_rows.items():
        say(("fallback: ", "yellow"), f"{rows} row(s) scored with the source model alone "
            f"({reason}: the correction needs it); see the note column")
    for warning in summary.warnings:
        say(("warning: ", "yellow"), warning)


@app.command()
@user_command
def status(
    out: Annotated[Path, typer.Argument(help="The run's output folder.")] = Path(
        "fedadapt-out"),
    site_dir: Annotated[Path | None, typer.Option(
        help="Show a site's folder instead: its audit log, ledger and policy.",
        show_default=False)] = None,
    host: Annotated[str, typer.Option(help="Address to serve on (loopback: this machine "
                                           "only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0: a free one).")] = 8765,
) -> None:
    """Serve a read-only page of a run: its phase, round, loss, sites and, once done, report.

    OUT is the run's output folder (--out of simulate or deploy-local, or the run config's
    out); the page follows a live run. With --site-dir, a site's page instead: its audit
    log and the hash chain's verdict, its privacy ledger, its policy in words. Ctrl-C stops
    it.
    """
    import signal

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # Ctrl-C and SIGTERM stop it (a background job's SIGINT may arrive ignored: restored).
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    folder = site_dir if site_dir is not None else out
    if not folder.is_dir():
        fail(f"{folder} is not a folder: name the run's output folder or a site's folder")
    if site_dir is not None:
        from client.site_status import site_page

        server = site_page(site_dir, None, host, port)
    else:
        from server.status_page import run_page

        server = run_page(out, host, port)
    say(f"status of {folder.resolve()} at http://{host}:{server.server_address[1]}/ "
        "(read-only; Ctrl-C stops it)")
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        say("stopped")
    finally:
        server.server_close()


@app.command("app-hash")
@user_command
def app_hash(
    project: Annotated[Path, typer.Argument(help="The Flower app's folder.")] = Path(),
) -> None:
    """Print the sha256 of the app bundle `flwr run PROJECT` sends (for approved-apps).

    PROJECT is the Flower app's folder (the one holding pyproject.toml), by default the
    current folder.
    """
    from executor.approved_app import bundle_hash

    try:
        print(bundle_hash(project))
    except ValueError as err:
        fail(str(err))


@app.command("site-exec")
@user_command
def site_exec(
    policy: Annotated[Path, typer.Option(help="The site's policy file (approved-apps).")],
    runtime_api_address: Annotated[str, typer.Option(
        help="The SuperNode's runtime API: 127.0.0.1 and its --port.")] = "127.0.0.1:9094",
    root_certificates: Annotated[Path | None, typer.Option(
        help="CA of the runtime API's certificate (a SuperNode with --ssl-certfile); "
             "without it the loopback API is reached without TLS.",
        show_default=False)] = None,
    parent_pid: Annotated[int | None, typer.Option(
        help="Stop when this process ends.", show_default=False)] = None,
) -> None:
    """Run a site's tasks, each only after its app bundle's hash is approved by the policy.

    For a SuperNode started with --isolation process; replaces the executor it would start.
    """
    from executor.approved_app import site_exec as run

    run(policy, runtime_api_address, insecure=root_certificates is None,  # PolicyError: 1 line
        root_certificates=str(root_certificates) if root_certificates else None,
        parent_pid=parent_pid)


@app.command()
@user_command
def drill(
    scenarios: Annotated[list[str] | None, typer.Argument(
        help="Scenarios to run (all when none is named).")] = None,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("fedadapt-drills"),
    list_only: Annotated[bool, typer.Option("--list", help="List the scenarios.")] = False,
) -> None:
    """Run reliability drills for real: faults and bad input, each with its figure.

    SCENARIOS are the drills to run, by name (`--list` shows them); all when none is named.
    """
    from rich.table import Table

    from drills.base import DRILLS
    from drills.runner import load_drills, run_drills

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    load_drills()
    if list_only:
        for d in DRILLS.values():
            say((d.name, "bold"), f" ({d.engine}): {d.expected}")
        return
    unknown = [s for s in scenarios or [] if s not in DRILLS]
    if unknown:
        fail(f"unknown drill(s) {', '.join(unknown)}; known: {', '.join(DRILLS)}")
    with stops_its_processes("the drills"), _quiet("client"), console.status(
            "running drills (each starts Flower)..."):
        results = run_drills(scenarios or [], _out_dir(out))
    table = Table("scenario", "expected", "observed", "pass", show_lines=True)
    for r in results:
        table.add_row(Text(r.scenario), Text(r.expected), Text(r.observed),
                      Text("skipped", style="yellow") if r.skipped
                      else Text("yes", style="green") if r.passed else Text("NO", style="red"))
    console.print(table)
    say(f"wrote {out / 'drills.json'}")
    if not all(r.passed or r.skipped for r in results):  # a skipped drill did not fail
        raise typer.Exit(1)


def _numbers(option: str, text: str, kind: type[int] | type[float] = int) -> tuple[Any, ...]:
    """A comma-separated option as numbers; a bad one ends the command with one line."""
    try:
        return tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        fail(f"{option} {text!r}: give {'whole ' if kind is int else ''}numbers separated by "
             "commas, e.g. 10,100")


def _names(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


PART_PANEL = "Part {}"
BENCH = BenchOptions()  # the defaults of `fedadapt bench`'s options


def _joined(values: tuple[Any, ...]) -> str:
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


@app.command()
@user_command
@with_run_settings(exclude=SET_BY_COMMAND | {"dp", "dp-epsilon", "repeats"},
                   panel="Part privacy: the settings of its runs")
def bench(
    settings: RunSettings,
    given: set[str],
    out: Annotated[Path, typer.Option(help="Output folder (bench.json, plots).")] = Path(
        "fedadapt-bench"),
    parts: Annotated[str, typer.Option(help=(
        "Comma-separated parts: rounds, overhead, scale, site, bytes (the default), choice, "
        "deploy, privacy, nonlinear, secagg, bare. What each measures: docs/benchmarks.md."))] =
        _joined(BENCH.parts),
    heart: Annotated[Path | None, typer.Option(
        help="Folder of the UCI Heart Disease files: the rounds, choice and nonlinear parts "
             "run on the heart data too.", show_default=False)] = None,
    scale_sites: Annotated[str, typer.Option(
        help="Comma-separated numbers of virtual sites.",
        rich_help_panel=PART_PANEL.format("scale"))] = _joined(BENCH.scale_sites),
    scale_rounds: Annotated[int, typer.Option(
        help="Training rounds.", rich_help_panel=PART_PANEL.format("scale"))] =
        BENCH.scale_rounds,
    fit_rows: Annotated[str, typer.Option(
        help="Comma-separated training rows of the one big site.",
        rich_help_panel=PART_PANEL.format("site"))] = _joined(BENCH.fit_rows),
    predict_rows: Annotated[str, typer.Option(
        help=escape("Comma-separated rows the site scores. [default: the largest --fit-rows, "
                    "at most 100000]"), show_default=False,
        rich_help_panel=PART_PANEL.format("site"))] = "",
    site_measures: Annotated[str, typer.Option(
        help="Comma-separated: fit (the model choice), local (the local-only model), "
             "predict.", rich_help_panel=PART_PANEL.format("site"))] =
        _joined(BENCH.site_measures),
    site_features: Annotated[int, typer.Option(
        help="Raw features: three quarters shared, a quarter the site's own.",
        rich_help_panel=PART_PANEL.format("site"))] = BENCH.site_features,
    site_seed: Annotated[int, typer.Option(
        help="Seed of the site and of its folds.",
        rich_help_panel=PART_PANEL.format("site"))] = BENCH.site_seed,
    time_limit: Annotated[float, typer.Option(
        help="Seconds a measured call may run before it is stopped.",
        rich_help_panel=PART_PANEL.format("site"))] = BENCH.time_limit,
    memory_limit: Annotated[float, typer.Option(
        help="GiB of RSS at which a measurement is stopped.",
        rich_help_panel=PART_PANEL.format("site"))] = BENCH.memory_limit,
    choice_splits: Annotated[int, typer.Option(
        help="Seeded splits on the heart data (--heart).",
        rich_help_panel=PART_PANEL.format("choice"))] = BENCH.choice_splits,
    choice_generated_splits: Annotated[int, typer.Option(
        help="Seeded splits on the generated world.",
        rich_help_panel=PART_PANEL.format("choice"))] = BENCH.choice_generated_splits,
    deploy_sites: Annotated[int, typer.Option(
        help="Generated sites, deployed and simulated.",
        rich_help_panel=PART_PANEL.format("deploy"))] = BENCH.deploy_sites,
    data: Annotated[str, typer.Option(
        help=DATA_HELP + "; the run settings (below) apply to its runs.",
        rich_help_panel=PART_PANEL.format("privacy"))] = BENCH.data,
    splits: Annotated[int, typer.Option(
        help="Seeded splits, each a run per level.",
        rich_help_panel=PART_PANEL.format("privacy"))] = BENCH.splits,
    epsilons: Annotated[str, typer.Option(
        help="Per-run epsilons to compare with no DP, comma-separated.",
        rich_help_panel=PART_PANEL.format("privacy"))] = _joined(BENCH.epsilons),
    stats_dp: Annotated[bool, typer.Option(
        "--stats-dp", help="Also run each epsilon at sites whose policy requires DP (the stats "
        "released once with noise, as a deployed site's default policy has it).",
        rich_help_panel=PART_PANEL.format("privacy"))] = False,
    nonlinear_splits: Annotated[int, typer.Option(
        help=escape("Seeded splits per data set (needs LightGBM: pip install -e \".[bench]\")."),
        rich_help_panel=PART_PANEL.format("nonlinear"))] = BENCH.nonlinear_splits,
    bare_deployed: Annotated[bool, typer.Option(
        "--bare-deployed", help="Deployed as deploy-local starts it (TLS, authenticated "
        "nodes) instead of in the simulation engine.",
        rich_help_panel=PART_PANEL.format("bare"))] = False,
    bare_nodes: Annotated[int, typer.Option(
        help="Nodes.", rich_help_panel=PART_PANEL.format("bare"))] = BENCH.bare_nodes,
    bare_rounds: Annotated[int, typer.Option(
        help="Rounds.", rich_help_panel=PART_PANEL.format("bare"))] = BENCH.bare_rounds,
    bare_inputs: Annotated[int, typer.Option(
        help="Model inputs (the model has one weight more).",
        rich_help_panel=PART_PANEL.format("bare"))] = BENCH.bare_inputs,
    bare_rows: Annotated[int, typer.Option(
        help="Random rows per node.", rich_help_panel=PART_PANEL.format("bare"))] =
        BENCH.bare_rows,
    bare_poll_interval: Annotated[float, typer.Option(
        help="0: Flower's own polling; > 0: the ServerApp pulls replies this often, as "
             "fedadapt's does.", rich_help_panel=PART_PANEL.format("bare"))] =
        BENCH.bare_poll_interval,
    bare_gateway: Annotated[bool, typer.Option(
        "--bare-gateway", help="Deployed through fedadapt's Fleet gateway.",
        rich_help_panel=PART_PANEL.format("bare"))] = False,
    bare_timeout: Annotated[float, typer.Option(
        help="Stop the bare run after this many seconds.",
        rich_help_panel=PART_PANEL.format("bare"))] = BENCH.bare_timeout,
    secagg_sites: Annotated[str, typer.Option(
        help="Comma-separated numbers of in-process sites of one secure sum.",
        rich_help_panel=PART_PANEL.format("secagg"))] = _joined(BENCH.secagg_sites),
    secagg_ring: Annotated[int, typer.Option(
        help="Each site's neighbours where the sites are more (SecAgg+).",
        rich_help_panel=PART_PANEL.format("secagg"))] = BENCH.secagg_ring,
    secagg_deployed: Annotated[bool, typer.Option(
        help="Also time a deployed run (TLS) with and without secure aggregation.",
        rich_help_panel=PART_PANEL.format("secagg"))] = BENCH.secagg_deployed,
    render: Annotated[Path | None, typer.Option(
        help="Measure nothing: write the figures of this bench.json into --doc, dated.",
        show_default=False)] = None,
    doc: Annotated[Path, typer.Option(
        help="The page --render writes into (its measured section).")] = Path(
        "docs/benchmarks.md"),
) -> None:
    """Measure fedadapt: rounds to pooled, cost beside bare Flower, scale, privacy, and more."""
    if render is not None:
        from bench.report import render as write_figures

        if not render.is_file() or not doc.is_file():
            fail(f"{render if not render.is_file() else doc} not found")
        say(f"wrote the figures of {render} into {write_figures(render, doc)}")
        return
    options = BenchOptions(
        parts=_names(parts), heart=heart, scale_sites=_numbers("--scale-sites", scale_sites),
        scale_rounds=scale_rounds, fit_rows=_numbers("--fit-rows", fit_rows),
        predict_rows=_numbers("--predict-rows", predict_rows),
        site_measures=_names(site_measures), site_features=site_features,
        site_seed=site_seed, time_limit=time_limit, memory_limit=memory_limit,
        choice_splits=choice_splits, choice_generated_splits=choice_generated_splits,
        deploy_sites=deploy_sites, data=data, splits=splits,
        epsilons=_numbers("--epsilons", epsilons, float), stats_dp=stats_dp, settings=settings,
        nonlinear_splits=nonlinear_splits, bare_deployed=bare_deployed, bare_nodes=bare_nodes,
        bare_rounds=bare_rounds, bare_inputs=bare_inputs, bare_rows=bare_rows,
        bare_poll_interval=bare_poll_interval, bare_gateway=bare_gateway,
        bare_timeout=bare_timeout, secagg_sites=_numbers("--secagg-sites", secagg_sites),
        secagg_ring=secagg_ring, secagg_deployed=secagg_deployed)
    problems = options.problems()
    if given and "privacy" not in options.parts:
        problems.append(f"run settings ({', '.join('--' + k for k in sorted(given))}) apply to "
                        "the privacy part's runs: add privacy to --parts, or leave them out")
    if problems:
        fail("; ".join(problems))
    _bench(_out_dir(out), options)


def _bench(out: Path, options: BenchOptions) -> None:
    """Run the benchmark's parts and print what they measured."""
    from rich.table import Table

    from bench.nonlinear import MissingExtra
    from bench.plots import bench_rows
    from bench.run import run_bench

    with stops_its_processes("the benchmark"), _quiet("client"), _quiet("shared"), \
            _quiet("server"), _quiet("flwr"):
        try:
            result = run_bench(out, options, say=say)
        except MissingExtra as err:  # before anything ran
            fail(str(err))
    table = Table("figure", "measured", "target", width=100)
    for row in bench_rows(result):
        table.add_row(*(Text(c) for c in row))
    console.print(table)
    if result.get("privacy"):
        from bench.privacy import table_rows

        header, rows = table_rows(result["privacy"])
        privacy = Table(*header)
        for cells in rows:
            privacy.add_row(*[Text(c) for c in cells])
        console.print(privacy)
    say(f"wrote {out / 'bench.json'} and plots in {out / 'plots'}"
        + (f"; {out / 'privacy.md'}" if result.get("privacy") else ""))


@app.command("init-site")
@user_command
def init_site(
    site_dir: Annotated[Path, typer.Argument(help="The site's private folder (site-dir).")],
    name: Annotated[str, typer.Option(help="The site's name: the one the coordinator "
                                           "registered its key with.")],
    data_file: Annotated[str, typer.Option(help="The site's export, for the node config "
                                                "printed.")] = "/data/export.csv",
) -> None:
    """Make a deployed site's folder: keys, split secret, a policy requiring DP, audit log."""
    from client.site_setup import init_site as make

    folder = make(site_dir, name)
    made = ", ".join(folder.created) or "nothing (every file was there; none replaced)"
    say((f"{folder.site_dir}", "bold"), f" is site {folder.name}'s folder; created: {made}")
    check_policy(folder.policy)
    say("Start its SuperNode with:")
    say(f"  --node-config '{folder.node_config(data_file)}'")


@app.command("reset-ledger")
@user_command
def reset_ledger(
    site_dir: Annotated[Path, typer.Option(help="The site's private folder (site-dir).")],
) -> None:
    """Restore a site's privacy ledger from its audit log (after it was lost or rolled back)."""
    from client.ledger import reset

    try:
        ledger = reset(site_dir)
    except ValueError as err:
        fail(str(err))
    say(f"ledger of {site_dir} restored from its audit log (update {ledger['sequence']}): "
        f"{ledger['rounds']} training rounds, total epsilon {ledger['total-epsilon']:.3f} over "
        f"{len(ledger['runs'])} run(s) and {len(ledger['releases'])} release(s); the reset "
        "is in the audit log")


@app.command("site-results")
@user_command
def site_results(
    site_dir: Annotated[Path, typer.Option(help="The site's private folder (site-dir).")],
) -> None:
    """Show a site's own held-out results, kept at the site (never sent under DP)."""
    from client.results import read_results

    results = read_results(site_dir)
    if not results:
        fail(f"{site_dir}: no kept results yet (the site has not answered an evaluate phase)")
    say(f"held-out results kept at {site_dir}:")
    for line in result_lines([r.row() for r in results]):
        say(line)



@app.command("check-policy")
@user_command
def check_policy(
    file: Annotated[Path, typer.Argument(help="The site's policy file (TOML).")],
) -> None:
    """Check a site's policy file and print what it allows."""
    from client.policy import read_policy

    policy = read_policy(file)
    say((f"{policy.path} is a valid site policy", "bold green"), ". This site:")
    for line in policy.describe():
        say(f"  - {line}")


@app.command("check-data")
@user_command
def check_data(
    file: Annotated[Path, typer.Argument(help="The site's data file.")],
    schema: Annotated[str, typer.Option(
        help="'heart', 'synthetic' or a schema TOML file.")] = "synthetic",
    site_features: Annotated[str, typer.Option(
        help="Comma-separated site-only features this site will use (none: leave out).")] = "",
) -> None:
    """Check a site's data file against a schema: a summary, or the errors to fix."""
    from rich.table import Table

    from client.check import check_file

    with _quiet("client"):  # the reader's warnings are printed below, once
        result = check_file(file, schema, [f.strip() for f in site_features.split(",")
                                           if f.strip()])
    if not result.ok:
        say((f"{file} does not fit schema {schema!r}:", "bold red"), err=True)
        for line in result.errors:
            say(f"  {line}", err=True)
        raise typer.Exit(1)
    say((f"{file} fits schema {schema!r}", "bold green"),
        f": {result.rows} rows, {result.negatives} negative / {result.positives} positive "
        f"({result.positives / result.rows:.0%} positive)")
    table = Table("feature", "used", "present", "missing", "of which coded", "out of range")
    for f in result.features:
        table.add_row(Text(f["feature"]), "yes" if f["used"] else "no",
                      "yes" if f["present"] else Text("absent", style="yellow"),
                      str(f["missing"]), str(f["missing_coded"]), str(f["out_of_range"]))
    console.print(table)
    for w in result.warnings:
        say(("warning: ", "yellow"), w)


@app.command()
@user_command
def audit(
    site_dir: Annotated[Path, typer.Option(help="The site's private folder (site-dir).")],
    json_out: Annotated[bool, typer.Option(
        "--json", help="Print the entries, totals and chain check as one JSON object.")] = False,
    verify: Annotated[bool, typer.Option(
        "--verify", help="Check the log's hash chain: one line, exit 1 if it is broken.")] = False,
    head: Annotated[str | None, typer.Option(
        "--head", metavar="HASH", help="A head hash kept earlier: check that it is still in the "
        "log (entries were removed or rewritten if not). Implies --verify.")] = None,
) -> None:
    """Show what a site sent: every reply in its audit log, the bytes per run, the chain's head."""
    import json
    import re

    from rich.table import Table

    from client.audit_log import audit_path, read_audit, verify_chain

    if head is not None:
        head = head.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", head):
            fail(f"--head {head}: not a sha256 hash (64 hexadecimal digits)")
        verify = True
    try:
        log = read_audit(site_dir)
        chain = verify_chain(log.path, head)
    except FileNotFoundError:
        fail(f"{audit_path(site_dir)} not found: --site-dir names a site's folder, which has "
             "an audit log once the site has answered a message")
    if json_out:
        print(json.dumps({"path": str(log.path), "entries": log.entries,
                          "totals": log.totals(), "unreadable_lines": log.unreadable,
                          "head": chain.head, "chain": chain.as_dict()}))
        if verify and not (chain.ok and chain.kept_head_found is not False):
            raise typer.Exit(1)
        return
    broken = f"{chain.path}:{chain.line}: audit chain broken: {chain.reason}"
    if verify:
        if not chain.ok:
            say(broken, err=True)
            raise typer.Exit(1)
        if chain.kept_head_found is False:
            say(f"audit log {chain.path}: the kept head {head} is not in the log: entries were "
                "removed or rewritten", err=True)
            raise typer.Exit(1)
        kept = "" if head is None else f"; kept head found at line {chain.kept_head_line}"
        say(f"audit log {chain.path}: {chain.entries} entries, chain intact; head sha256 "
            f"{chain.head}{kept}")
        return
    if not chain.ok:
        say(("warning: ", "yellow"), broken)
    table = Table(title=str(log.path))
    for name in ("time (UTC)", "run"):  # a run id is 19 digits: never cut or wrapped
        table.add_column(name, no_wrap=True)
    table.add_column("phase", overflow="fold")  # an event's name wraps after its hyphens
    for number in ("round", "keys", "arrays", "bytes"):
        table.add_column(number, justify="right", no_wrap=True)
    table.add_column("status")
    for time, run, phase, *rest in log.rows():
        table.add_row(*(Text(c) for c in (time, run, phase.replace("-", "-\n"), *rest)))
    console.print(table)
    for run, t in log.totals().items():
        say(f"run {run}: {t['replies']} repl{'y' if t['replies'] == 1 else 'ies'}, "
            f"{t['bytes']:,} bytes sent"
            + (f", {t['errors']} of them errors or refusals" if t["errors"] else ""))
    if log.unreadable:
        say(("warning: ", "yellow"), f"line(s) {', '.join(map(str, log.unreadable))} of "
            f"{log.path} are not JSON objects (a write cut short?)")
    say(f"head sha256 {chain.head}")
    explain("Keep the head elsewhere (the site's change log): --verify --head HASH later says "
            "whether entries were removed or rewritten since.")


@app.command()
@user_command
def generate(
    out: Annotated[Path, typer.Option(help="Folder for the site files and sites.toml.")],
    sites: Annotated[int, typer.Option(help="Number of hospitals (at least 1).")] = ROLES,
    seed: Annotated[int, typer.Option(help="Seed.")] = 42,
    force: Annotated[bool, typer.Option(
        help="Replace files of the same names that fedadapt did not write.")] = False,
    hba1c: Annotated[bool, typer.Option(
        help="A second site-only feature, HbA1c, with its own effect, measured by other "
             "sites than glucose.")] = False,
) -> None:
    """Write generated hospitals (one CSV each), their sites.toml and the ground truth."""
    from simulations.generator import generate as gen

    if sites < 1:
        fail(f"--sites {sites}: generate at least 1 site")
    manifest = gen(_out_dir(out), n_sites=sites, seed=seed, force=force, hba1c=hba1c)
    say(f"wrote {sites} site files and {manifest}")


@contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Show only errors of ``logger`` inside the block."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _print_results(report: dict[str, Any], out: Path) -> None:
    from server.report import site_table

    console.print(site_table(report))
    for name, site in report.get("sites", {}).items():
        for r in site.get("refused", []):
            at = f" from round {r['round']}" if r.get("round") is not None else ""
            say((f"{name}: refused {r['phase']}{at}", "yellow"),
                f" by its policy, rule '{r['rule']}': {r['reason']}")
        if site.get("refused") and site.get("status") in ("ok", "refused"):
            continue
        if site.get("status") != "ok" or site.get("lost"):
            say((f"{name}: {site.get('status')}", "yellow"),
                f" ({site.get('error') or _lost_text(site)})")
    client_dp = report.get("dp") or {}
    if client_dp.get("epsilon") is not None:
        say(f"differential privacy (client level): epsilon {client_dp['epsilon']:.2f} at "
            f"delta {client_dp.get('delta')} per site, noise multiplier "
            f"{client_dp.get('noise_multiplier', float('nan')):.2f}, clipping norm "
            f"{client_dp.get('clipping_norm')}")
    spent = {name: site["dp"] for name, site in report.get("sites", {}).items()
             if site.get("dp")}
    if spent:
        say("differential privacy (record level), epsilon spent this run: " + ", ".join(
            f"{name} {dp['epsilon']:.2f}" + (" (stopped)" if dp.get("stopped") else "")
            for name, dp in spent.items() if dp.get("epsilon") is not None)
            + f" at delta {next(iter(spent.values())).get('delta')}")
    for name, site in report.get("sites", {}).items():
        a = site.get("assessment")
        if site.get("status") == "ok" and a:
            explain((f"{name}", "bold"), f" should {a['use']}")
            explain(f"{a['verdict']}", indent=4)
    summary = report.get("summary", {})
    methods = summary.get("methods", {})
    parts = [f"{'true model' if m == 'oracle' else m} {v['mean_accuracy']:.3f}"
             for m, v in methods.items() if v.get("mean_accuracy") is not None]
    if parts:
        majority = summary.get("majority_accuracy")
        base = f" (majority label {majority:.3f})" if majority is not None else ""
        say("mean accuracy over the sites that can judge: " + ", ".join(parts) + base)
    planned = report.get("config", {}).get("num-server-rounds")
    converged = [r for r in report.get("converged_rounds") or [] if r is not None]
    if converged and planned is not None and max(converged) < planned:
        say(f"training converged in round {', '.join(map(str, converged))} of the {planned} "
            "planned; the later rounds were not run (Flower still prints their headings)")
    fvp = summary.get("federated_vs_pooled")
    if fvp and fvp.get("difference") is not None:
        say(f"held-out log-loss: federated source {fvp['source_log_loss']:.4f}, "
            f"pooled {fvp['pooled_log_loss']:.4f} (difference {fvp['difference']:+.4f})")
    sa = report.get("secagg")
    if sa:
        say(f"secure aggregation: the coordinator read only totals, each within "
            f"{sa['error_bound']:.1g} of the exact sum; no value clipped (largest summed "
            f"{sa['largest_total']:.3g}, range {sa['clip']:g})")
    for note in report.get("notes", []):
        say(("note: ", "yellow"), note)
    say(f"took {report['timing_s']['total']:.1f} s in Flower; report: "
        f"{out / 'report.json'}, {out / 'report.md'}, plots in {out / 'plots'}")


def _print_kept_results(report: dict[str, Any], sites: Path) -> None:
    """The held-out results the sites kept (shown here because this machine holds them all)."""
    from client.results import read_results

    run = report.get("config", {}).get("run_id")
    kept = {name: [r for r in read_results(sites / name) if r.run == run]
            for name, site in report.get("sites", {}).items()
            if site.get("status") == "withheld"}
    if not any(kept.values()):
        return
    say("held-out results kept at each site (a site alone sees its own: `fedadapt "
        "site-results`):")
    rows = [(name, *r.row()[2:]) for name, results in kept.items() for r in results]
    for line in result_lines(rows, ("site", *RESULT_COLUMNS[2:])):
        say(line)



def result_lines(rows: list[tuple[str, ...]], header: tuple[str, ...] = RESULT_COLUMNS
                 ) -> list[str]:
    """Rows of results as aligned text: the first and last columns left, numbers right."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    last = len(header) - 1

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if i in (0, last) else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    return [line(header), *(line(r) for r in rows)]


def _lost_text(site: dict[str, Any]) -> str:
    lost = site.get("lost") or [{}]
    missed = lost[0].get("rounds_missed") or []
    rounds = f"{missed[0]}-{missed[-1]}" if len(missed) > 1 else ", ".join(map(str, missed))
    return (f"lost in training round {lost[0].get('round')}, missed rounds {rounds}; back for "
            "adapt and evaluate")


def main() -> None:
    """Entry point for ``python -m fedadapt``."""
    app()
