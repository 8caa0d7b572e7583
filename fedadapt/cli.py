"""The ``fedadapt`` command: parses arguments and hands each job to the package that owns it."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

app = typer.Typer(
    help="fedadapt: hospitals learn one risk model together, then each makes it its own.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
# Tables are about 140 columns wide; when the output is not a terminal (a log, CI), do not
# squeeze them to the 80 columns rich assumes.
console = Console() if Console().is_terminal else Console(width=160)
err_console = Console(stderr=True)


@app.command()
def simulate(
    data: Annotated[str, typer.Option(
        help="'synthetic' (generated hospitals), 'heart:DIR' (UCI files) or a folder with "
             "sites.toml")] = "synthetic",
    sites: Annotated[int, typer.Option(help="Generated hospitals (synthetic data only).")] = 4,
    rounds: Annotated[int, typer.Option(help="Federated training rounds.")] = 30,
    repeats: Annotated[int, typer.Option(
        help="Seeded train/held-out splits; metrics are mean and sd over them.")] = 1,
    protocol: Annotated[str, typer.Option(
        help="'default' (every row, imputed) or 'flamby' (FLamby's Fed-Heart-Disease rows "
             "and split)")] = "default",
    seed: Annotated[int, typer.Option(help="Seed of data generation, splits and models.")] = 42,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("fedadapt-out"),
    strategy: Annotated[str, typer.Option(help="'fedavg' or 'fedprox'.")] = "fedavg",
    proximal_mu: Annotated[float, typer.Option(help="FedProx's proximal term.")] = 0.01,
    model: Annotated[str, typer.Option(help="'logreg' or 'mlp'.")] = "logreg",
    local_epochs: Annotated[int, typer.Option(help="Local epochs per round.")] = 5,
    learning_rate: Annotated[float, typer.Option(help="Local SGD learning rate.")] = 0.5,
    timeout: Annotated[float, typer.Option(help="Stop the run after this many seconds.")] = 3600,
) -> None:
    """Run the whole pipeline over virtual hospitals in Flower's simulation engine."""
    from shared.settings import RunSettings, SettingsError
    from simulations.datasets import DatasetError
    from simulations.flower import SimulationError
    from simulations.simulate import simulate as run

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = RunSettings.from_run_config({
            "num-server-rounds": rounds, "repeats": repeats, "protocol": protocol, "seed": seed,
            "strategy": strategy, "proximal-mu": proximal_mu if strategy == "fedprox" else 0.0,
            "model": model, "local-epochs": local_epochs, "learning-rate": learning_rate,
        })
    except SettingsError as err:
        _fail(str(err))
    progress = _RunProgress(repeats, rounds)
    try:
        # The pooled reference re-reads the site files here: their warnings are the sites' own
        # (already in logs/flwr-run.log); do not repeat them under the progress bar.
        with progress, _quiet("client"):
            report = run(data, out, settings, n_sites=sites, on_event=progress.update,
                         timeout=timeout)
    except (DatasetError, SimulationError) as err:
        _fail(str(err))
    _print_results(report, out)


@app.command()
def certs(
    out: Annotated[Path, typer.Option(help="Folder for the CA, SuperLink and site keys.")],
    sites: Annotated[int, typer.Option(help="Number of sites.")],
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
        files = make_certs(out, sites, host or [], [n.strip() for n in names.split(",")
                                                      if n.strip()] or None, force=force)
    except (ValueError, FileExistsError) as err:
        _fail(str(err))
    for path in files.written:
        console.print(f"wrote {path}", highlight=False)
    for path in files.kept:
        console.print(f"[yellow]kept[/] {path} (exists; --force replaces it)", highlight=False)
    if files.guide is not None:
        console.print(files.guide.read_text(), highlight=False, markup=False)


@app.command("deploy-local")
def deploy_local(
    sites: Annotated[int, typer.Option(help="Generated hospitals (synthetic data only).")] = 4,
    data: Annotated[str, typer.Option(
        help="'synthetic', 'heart:DIR' or a folder with sites.toml")] = "synthetic",
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("fedadapt-deploy"),
    rounds: Annotated[int, typer.Option(help="Federated training rounds.")] = 30,
    repeats: Annotated[int, typer.Option(help="Seeded train/held-out splits.")] = 1,
    protocol: Annotated[str, typer.Option(help="'default' or 'flamby'.")] = "default",
    seed: Annotated[int, typer.Option(help="Seed of data, splits and models.")] = 42,
    timeout: Annotated[float, typer.Option(help="Stop the run after this many seconds.")] = 3600,
) -> None:
    """Run the federation for real on this machine: TLS, authenticated SuperNodes, report."""
    import signal

    from shared.settings import RunSettings, SettingsError
    from simulations.datasets import DatasetError
    from simulations.deploy import DeploymentError
    from simulations.deploy import deploy_local as run

    # `kill` (SIGTERM) must stop the processes we started, like Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = RunSettings.from_run_config({
            "num-server-rounds": rounds, "repeats": repeats, "protocol": protocol,
            "seed": seed, "node-wait-timeout": 120.0})
    except SettingsError as err:
        _fail(str(err))

    def show_logs(logs: dict[str, Path]) -> None:
        console.print("logs: " + "; ".join(f"{k}: {v}" for k, v in logs.items())
                      + f"; run: {out.resolve() / 'logs' / 'flwr-run.log'}", highlight=False)

    progress = _RunProgress(repeats, rounds, pooled=False)
    try:
        with progress, _quiet("client"):
            report = run(data, out, settings, n_sites=sites, on_event=progress.update,
                         on_logs=show_logs, timeout=timeout)
    except (DatasetError, DeploymentError) as err:
        _fail(str(err))
    except KeyboardInterrupt:
        _fail("interrupted: every process started was stopped")
    _print_results(report, out)
    d = report["deployment"]
    mean = d["mean_round_latency_s"]
    console.print(f"deployment: start-up {d['startup_s']:.1f} s, run {d['run_s']:.1f} s"
                  + (f", {mean:.2f} s per round" if mean is not None else "")
                  + "; TLS on every connection, authenticated SuperNodes")


@app.command()
def predict(
    site_dir: Annotated[Path, typer.Option(help="The site's private folder (site-dir).")],
    input: Annotated[Path, typer.Option(help="New patients (the schema's format).")],
    output: Annotated[Path, typer.Option(help="Where to write one risk per row (CSV).")],
) -> None:
    """Score new patients at a site with the source model and the site's own correction."""
    from client.data import DataError
    from client.model_store import ModelStoreError
    from client.predict import predict_file
    from client.store import CorrectionRefused

    try:
        with _quiet("client"):
            summary = predict_file(site_dir, input, output)
    except CorrectionRefused as err:
        _fail(f"the site's correction was refused ({err.reason}): {err}")
    except (ModelStoreError, DataError, ValueError) as err:
        _fail(str(err))
    console.print(f"scored {summary.rows} rows into {summary.output} (source model "
                  f"{summary.source_model[:16]}, correction "
                  f"{'applied' if summary.correction_applied else 'not applied'})",
                  highlight=False)


@app.command()
def drill(
    scenarios: Annotated[list[str] | None, typer.Argument(
        help="Scenarios to run (all when none is named).")] = None,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("fedadapt-drills"),
    list_only: Annotated[bool, typer.Option("--list", help="List the scenarios.")] = False,
) -> None:
    """Run reliability drills for real: faults and bad input, each with its figure."""
    from rich.table import Table

    from simulations.drills.base import DRILLS
    from simulations.drills.runner import load_drills, run_drills

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    load_drills()
    if list_only:
        for d in DRILLS.values():
            console.print(f"[bold]{d.name}[/] ({d.engine}): {d.expected}", highlight=False)
        return
    try:
        with _quiet("client"), console.status("running drills (each starts Flower)..."):
            results = run_drills(scenarios or [], out)
    except ValueError as err:
        _fail(str(err))
    table = Table("scenario", "expected", "observed", "pass", show_lines=True)
    for r in results:
        table.add_row(r.scenario, r.expected, r.observed,
                      "[green]yes[/]" if r.passed else "[red]NO[/]")
    console.print(table)
    console.print(f"wrote {out / 'drills.json'}", highlight=False)
    if not all(r.passed for r in results):
        raise typer.Exit(1)


@app.command("check-data")
def check_data(
    file: Annotated[Path, typer.Argument(help="The site's data file.")],
    schema: Annotated[str, typer.Option(
        help="'heart', 'synthetic' or a schema TOML file.")] = "synthetic",
    site_features: Annotated[str, typer.Option(
        help="Comma-separated site-only features this site will use.")] = "",
) -> None:
    """Check a site's data file against a schema: a summary, or the errors to fix."""
    from rich.table import Table

    from client.check import check_file


    with _quiet("client"):  # the reader's warnings are printed below, once
        result = check_file(file, schema, [f for f in site_features.split(",") if f.strip()])
    if not result.ok:
        err_console.print(f"[bold red]{file} does not fit schema {schema!r}:[/]")
        for line in result.errors:
            err_console.print(f"  {line}", markup=False, highlight=False)
        raise typer.Exit(1)
    console.print(f"[bold green]{file} fits schema {schema!r}[/]: {result.rows} rows, "
                  f"{result.negatives} negative / {result.positives} positive "
                  f"({result.positives / result.rows:.0%} positive)")
    table = Table("feature", "used", "present", "missing", "of which coded", "out of range")
    for f in result.features:
        table.add_row(f["feature"], "yes" if f["used"] else "no",
                      "yes" if f["present"] else "[yellow]absent[/]", str(f["missing"]),
                      str(f["missing_coded"]), str(f["out_of_range"]))
    console.print(table)
    for w in result.warnings:
        console.print(f"[yellow]warning:[/] {w}", markup=True, highlight=False)


@app.command()
def generate(
    out: Annotated[Path, typer.Option(help="Folder for the site files and sites.toml.")],
    sites: Annotated[int, typer.Option(help="Number of hospitals.")] = 4,
    seed: Annotated[int, typer.Option(help="Seed.")] = 42,
) -> None:
    """Write generated hospitals (one CSV each), their sites.toml and the ground truth."""
    from simulations.generator import generate as gen

    manifest = gen(out, n_sites=sites, seed=seed)
    console.print(f"wrote {sites} site files and {manifest}")


def _interrupt(signum: int, frame: object) -> None:
    """Turn SIGTERM into KeyboardInterrupt, so that cleanup code runs."""
    raise KeyboardInterrupt


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


class _RunProgress:
    """A progress bar fed by the ServerApp's events."""

    def __init__(self, repeats: int, rounds: int, pooled: bool = True) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.rounds = rounds
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(),
                            TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                            console=console)
        # Per repeat: stats, the rounds, adapt, evaluate; then the pooled reference.
        self.task = self.bar.add_task("starting Flower",
                                      total=repeats * (rounds + 3) + int(pooled))

    def __enter__(self) -> _RunProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(None, None, None)

    def update(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        rep = f"repeat {event.get('repeat', 0) + 1}/{event.get('repeats', 1)}"
        if kind == "waiting":
            self.bar.update(self.task, description="waiting for sites")
        elif kind == "phase":
            phase = event["phase"]
            if phase != "train":
                self.bar.advance(self.task)
            self.bar.update(self.task, description=f"{rep}: {phase}")
        elif kind == "round":
            loss = event.get("loss")
            text = f" loss {loss:.4f}" if isinstance(loss, float) else ""
            self.bar.advance(self.task)
            self.bar.update(self.task, description=(
                f"{rep}: round {event['round']}/{event['rounds']}{text}"))
        elif kind == "pooled":
            self.bar.advance(self.task)
            self.bar.update(self.task, description="pooled reference")


def _print_results(report: dict[str, Any], out: Path) -> None:
    from server.report import site_table

    console.print(site_table(report))
    summary = report.get("summary", {})
    methods = summary.get("methods", {})
    parts = [f"{m} {v['mean_accuracy']:.3f}" for m, v in methods.items()
             if v.get("mean_accuracy") is not None]
    if parts:
        majority = summary.get("majority_accuracy")
        base = f" (majority label {majority:.3f})" if majority is not None else ""
        console.print("mean accuracy over sites: " + ", ".join(parts) + base)
    fvp = summary.get("federated_vs_pooled")
    if fvp and fvp.get("difference") is not None:
        console.print(f"held-out log-loss: federated source {fvp['source_log_loss']:.4f}, "
                      f"pooled {fvp['pooled_log_loss']:.4f} (difference "
                      f"{fvp['difference']:+.4f})")
    console.print(f"took {report['timing_s']['total']:.1f} s in Flower; report: "
                  f"{out / 'report.json'}, {out / 'report.md'}, plots in {out / 'plots'}")


def _fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(1)


def main() -> None:
    """Entry point for ``python -m fedadapt``."""
    app()
