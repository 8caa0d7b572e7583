"""Who this site is and where its files are: ``node_config``, or a manifest in simulation.

In deployment a SuperNode is started with ``--node-config`` naming its data file, its site-only
features, its private folder (encrypted correction and key) and its name. In Flower's
simulation engine a node only knows its ``partition-id``; the run config then names a sites
manifest (TOML, written by ``fedadapt generate`` or ``fedadapt simulate``) whose
``partition-id``-th entry holds the same settings.

A relative manifest path resolves against the working directory of the process, which Flower
sets to wherever the SuperLink (simulation) was started: for ``flwr run .`` from the project
folder, the project folder. Data never travels inside Flower's app bundle.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from shared.errors import FedadaptError
from shared.protocol import site_name_problem
from shared.tomlfile import read_toml

# node_config keys of a deployed site.
DATA_FILE = "data-file"
SITE_FEATURES = "site-features"
SITE_DIR = "site-dir"
SITE_NAME = "site-name"
SCHEMA = "schema"
POLICY = "policy"  # the site's policy file (client.policy); optional
# The site's own split (client.split): its held-out share and row protocol. A deployed site
# draws its split from a secret of its own; the coordinator's split settings select no row.
TEST_FRACTION = "test-fraction"
PROTOCOL = "protocol"
# A node whose every site a researcher owns (a simulation, an in-process federation): it
# follows the run's split settings and answers without the deployment's safe defaults.
SIMULATED = "simulated"
PROTOCOLS = ("default", "flamby")
DEFAULT_TEST_FRACTION = 0.3
MANIFEST = "sites manifest"  # what messages call the file


class SiteConfigError(FedadaptError, ValueError):
    """The site's settings are missing or inconsistent; the message says what to set."""


class SchemaMismatch(SiteConfigError):
    """The site's schema differs from the one the run uses."""


@dataclass(frozen=True)
class SiteSettings:
    """Everything a site needs to know about itself."""

    name: str
    data_file: Path
    site_features: tuple[str, ...]
    site_dir: Path
    schema: str | None = None
    policy: Path | None = None
    simulated: bool = False
    test_fraction: float = DEFAULT_TEST_FRACTION
    protocol: str = "default"

    @property
    def deployed(self) -> bool:
        """A site of a real deployment: it owns its split and has the safe defaults."""
        return not self.simulated


@dataclass(frozen=True)
class Manifest:
    """A simulated federation: the schema and one entry per site."""

    path: Path
    schema: str
    sites: tuple[SiteSettings, ...]


def resolve_site(node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> SiteSettings:
    """Return this site's settings.

    Parameters
    ----------
    node_config : mapping
        The SuperNode's ``node_config``: ``data-file`` (and ``site-dir``, ``site-name``,
        ``site-features`` as a comma-separated list, optionally ``schema``) in deployment;
        ``partition-id`` in simulation.
    run_config : mapping
        The run config: ``sites-manifest`` and ``out`` are used in simulation.

    Returns
    -------
    SiteSettings
        With absolute paths.

    Raises
    ------
    SiteConfigError
        If neither a data file nor a manifest entry can be found.
    """
    if DATA_FILE in node_config:
        missing = [k for k in (SITE_DIR, SITE_NAME) if not str(node_config.get(k, "")).strip()]
        if missing:
            raise SiteConfigError(
                f"node_config sets {DATA_FILE} but not {', '.join(missing)}: start the "
                "SuperNode with --node-config 'data-file=\"...\" site-dir=\"...\" "
                "site-name=\"...\" site-features=\"a,b\"'"
            )
        features = tuple(
            f.strip() for f in str(node_config.get(SITE_FEATURES, "")).split(",") if f.strip()
        )
        problem = site_name_problem(str(node_config[SITE_NAME]))
        if problem:
            raise SiteConfigError(f"node_config {SITE_NAME}: {problem}")
        simulated = node_config.get(SIMULATED, False)
        if not isinstance(simulated, bool):
            raise SiteConfigError(f"node_config {SIMULATED} must be true or false")
        return SiteSettings(
            name=str(node_config[SITE_NAME]),
            data_file=Path(str(node_config[DATA_FILE])).expanduser().resolve(),
            site_features=features,
            site_dir=Path(str(node_config[SITE_DIR])).expanduser().resolve(),
            schema=str(node_config[SCHEMA]) if SCHEMA in node_config else None,
            policy=_optional_path(node_config.get(POLICY), Path.cwd()),
            simulated=simulated,
            test_fraction=_test_fraction(node_config.get(TEST_FRACTION)),
            protocol=_protocol(node_config.get(PROTOCOL)),
        )
    if "partition-id" in node_config:
        manifest_ref = str(run_config.get("sites-manifest", "")).strip()
        if not manifest_ref:
            raise SiteConfigError(
                "simulated site without data: set the run config 'sites-manifest' to a "
                "sites.toml (`fedadapt generate --out DIR` writes one)"
            )
        manifest = _manifest_of_simulation(_resolve(manifest_ref, Path.cwd()))
        pid = int(node_config["partition-id"])
        if not 0 <= pid < len(manifest.sites):
            raise SiteConfigError(
                f"simulated node {pid} has no entry in {manifest.path} "
                f"({len(manifest.sites)} sites): run with num-supernodes={len(manifest.sites)}"
            )
        site = manifest.sites[pid]
        if site.site_dir == Path():
            out = _resolve(str(run_config.get("out", "fedadapt-out")), Path.cwd())
            site = replace(site, site_dir=out / "sites" / site.name)
        return site
    raise SiteConfigError(
        "this node has no data: start the SuperNode with --node-config "
        "'data-file=\"...\" site-dir=\"...\" site-name=\"...\"'"
    )


def _manifest_of_simulation(path: Path) -> Manifest:
    """The manifest, parsed once per version of the file in this process.

    Every message to a virtual site resolves its entry: parsing the whole manifest each time
    would cost every message time in proportion to the number of sites.
    """
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise SiteConfigError(f"{path}: {MANIFEST} not found") from None
    return _read_manifest_cached(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _read_manifest_cached(path: str, mtime_ns: int, size: int) -> Manifest:
    return read_manifest(path)


def read_manifest(path: str | Path) -> Manifest:
    """Read a sites manifest; paths inside resolve against the manifest's folder.

    Parameters
    ----------
    path : str or Path
        The manifest (TOML: ``schema``, and one ``[[sites]]`` table per site).

    Returns
    -------
    Manifest
        Its schema and sites.

    Raises
    ------
    SiteConfigError
        If the file cannot be read or is not TOML, or an entry is incomplete or wrong: the
        message names file, line and column.
    """
    path = Path(path)
    doc = read_toml(path, MANIFEST, SiteConfigError)
    raw = doc.data
    entries = raw.get("sites", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise SiteConfigError(f"{doc.where('sites')}: sites must be [[sites]] tables")
    if "schema" in raw and not isinstance(raw["schema"], str):
        raise SiteConfigError(f"{doc.where('schema')}: schema must be a string: a built-in "
                              "schema's name or a schema file")
    base = path.resolve().parent
    sites = []
    names: set[str] = set()
    for i, entry in enumerate(entries):
        if "name" not in entry or "data-file" not in entry:
            raise SiteConfigError(f"{doc.where('sites', i)}: [[sites]] #{i + 1} needs 'name' "
                                  "and 'data-file'")
        name = str(entry["name"])
        problem = site_name_problem(name)
        if problem:
            raise SiteConfigError(f"{doc.where('sites', i, 'name')}: [[sites]] #{i + 1}: "
                                  f"{problem}")
        if name in names:
            raise SiteConfigError(f"{doc.where('sites', i, 'name')}: site name {name!r} "
                                  "appears twice")
        names.add(name)
        features = entry.get("site-features", [])
        if not isinstance(features, list):
            raise SiteConfigError(f"{doc.where('sites', i, 'site-features')}: site-features "
                                  "must be a list of feature names")
        site_dir = entry.get("site-dir")
        sites.append(SiteSettings(
            name=name,
            data_file=_resolve(str(entry["data-file"]), base),
            site_features=tuple(str(f) for f in features),
            site_dir=_resolve(str(site_dir), base) if site_dir else Path(),
            schema=str(raw["schema"]) if "schema" in raw else None,
            policy=_optional_path(entry.get(POLICY), base),
            simulated=True,
        ))
    if not sites:
        raise SiteConfigError(f"{doc.where('sites')}: no [[sites]] entries")
    schema = str(raw.get("schema", "synthetic"))
    return Manifest(path=path, schema=schema, sites=tuple(sites))


def write_manifest(
    path: str | Path, schema: str, sites: list[dict[str, Any]], comment: str = ""
) -> Path:
    """Write a sites manifest (the format :func:`read_manifest` reads).

    Parameters
    ----------
    path : str or Path
        Where to write.
    schema : str
        Built-in schema name or schema file path.
    sites : list of dict
        Entries with ``name``, ``data-file`` and optionally ``site-features``, ``site-dir``;
        other keys are written as strings (and ignored by :func:`read_manifest`).
    comment : str
        A first comment line (what wrote the file).

    Returns
    -------
    Path
        The written file.
    """
    import tomli_w  # only the tools that write manifests need it, never the ClientApp

    entries = []
    for s in sites:
        entry: dict[str, Any] = {"name": str(s["name"]), "data-file": str(s["data-file"]),
                                 "site-features": [str(f) for f in s.get("site-features", [])]}
        if s.get("site-dir"):
            entry["site-dir"] = str(s["site-dir"])
        # Anything else (a drill's fault) is written as a string.
        entry.update({k: str(v) for k, v in s.items() if k not in entry and k != "site-dir"})
        entries.append(entry)
    text = tomli_w.dumps({"schema": schema, "sites": entries})
    if comment:
        text = "".join(f"# {line}\n" for line in comment.splitlines()) + text
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8", newline="")
    return path


def _test_fraction(value: object) -> float:
    """The site's held-out share (node_config ``test-fraction``), 0.3 when not set."""
    if value is None:
        return DEFAULT_TEST_FRACTION
    try:
        fraction = float(str(value))
    except ValueError:
        fraction = -1.0
    if isinstance(value, bool) or not 0.05 <= fraction <= 0.95:
        raise SiteConfigError(f"node_config {TEST_FRACTION} must be a number from 0.05 to 0.95")
    return fraction


def _protocol(value: object) -> str:
    """The site's row protocol (node_config ``protocol``), ``default`` when not set."""
    protocol = "default" if value is None else str(value)
    if protocol not in PROTOCOLS:
        raise SiteConfigError(f"node_config {PROTOCOL} must be one of {', '.join(PROTOCOLS)}")
    return protocol


def _optional_path(ref: object, base: Path) -> Path | None:
    """An optional file setting: None when absent or blank, else an absolute path."""
    if ref is None or not str(ref).strip():
        return None
    return _resolve(str(ref), base)


def _resolve(ref: str, base: Path) -> Path:
    p = Path(ref).expanduser()
    return (p if p.is_absolute() else base / p).resolve()
