"""Built-in datasets, all turned into the same thing: a sites manifest naming one file per site."""

from __future__ import annotations

from pathlib import Path

from client.site import Manifest, read_manifest, write_manifest
from shared.errors import FedadaptError
from shared.settings import RunSettings
from simulations.generator import generate

HEART_CENTRES = ("cleveland", "hungarian", "switzerland", "va")
# slope, ca and thal are measured almost only at Cleveland: its correction may use them.
HEART_SITE_FEATURES = {"cleveland": ["slope", "ca", "thal"]}
HEART_SOURCE = "https://archive.ics.uci.edu/dataset/45/heart+disease"


class DatasetError(FedadaptError, ValueError):
    """A data specification that cannot be used; the message says what to give instead."""


def heart_manifest(data_dir: str | Path, out: str | Path) -> Path:
    """Write a manifest for the four UCI Heart Disease centres found in ``data_dir``.

    Raises
    ------
    DatasetError
        Naming the files that are missing and where to get them.
    """
    folder = Path(data_dir).expanduser().resolve()
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise DatasetError(f"heart:{data_dir}: {folder} {what}; name the folder holding the "
                           "four processed.*.data files of the UCI Heart Disease dataset")
    files = {c: folder / f"processed.{c}.data" for c in HEART_CENTRES}
    missing = [p.name for p in files.values() if not p.is_file()]
    if missing:
        raise DatasetError(
            f"{folder} lacks {', '.join(missing)}: download the four processed.*.data files "
            f"of the UCI Heart Disease dataset ({HEART_SOURCE}) into one folder"
        )
    return write_manifest(
        out, "heart",
        [{"name": c, "data-file": str(p), "site-features": HEART_SITE_FEATURES.get(c, [])}
         for c, p in files.items()],
        comment=f"UCI Heart Disease centres in {folder}",
    )


def prepare_data(spec: str, data_out: Path, n_sites: int, seed: int) -> Manifest:
    """Turn a ``--data`` value into a manifest.

    Parameters
    ----------
    spec : str
        ``synthetic`` (generated hospitals, written to ``data_out``), ``heart:DIR`` (the UCI
        files in DIR) or ``DIR`` (a folder holding a ``sites.toml`` manifest).
    data_out : Path
        Where generated files and manifests are written.
    n_sites : int
        Number of generated hospitals (``synthetic`` only).
    seed : int
        Seed of the generated hospitals.

    Returns
    -------
    Manifest
        The sites of the run.
    """
    if spec == "synthetic":
        return read_manifest(generate(data_out, n_sites=n_sites, seed=seed))
    if spec.startswith("heart:"):
        return read_manifest(heart_manifest(spec.split(":", 1)[1], data_out / "sites.toml"))
    folder = Path(spec).expanduser()
    manifest = folder / "sites.toml" if folder.is_dir() else folder
    if not manifest.is_file():
        raise DatasetError(
            f"--data {spec!r}: use 'synthetic', 'heart:DIR' or a folder with a sites.toml "
            "manifest (see README, 'Your own data')"
        )
    return read_manifest(manifest)


def check_site_count(n_sites: int, settings: RunSettings) -> None:
    """Refuse at once a run that could never start: fewer sites than ``min-sites``.

    Raises
    ------
    DatasetError
        Saying how many sites there are and which setting to change.
    """
    if n_sites < settings.min_sites:
        raise DatasetError(
            f"the data have {n_sites} site(s), fewer than min-sites = {settings.min_sites}: "
            f"give more sites (--sites N with generated data) or --min-sites {n_sites}"
        )


def sites_for_run(spec: str, out: Path, n_sites: int, settings: RunSettings) -> Manifest:
    """The sites of a run writing to ``out``: its ``--data`` as a manifest, checked to be enough.

    Generated files go to ``out/data``; paths in the manifest are absolute, so processes
    started elsewhere (SuperNodes, the simulation) find the files.

    Parameters
    ----------
    spec : str
        ``synthetic``, ``heart:DIR`` or a folder with a sites manifest.
    out : Path
        The run's output folder.
    n_sites : int
        Number of generated hospitals (``synthetic`` only).
    settings : RunSettings
        The run's settings (``seed``, ``min-sites``).

    Raises
    ------
    DatasetError
        If ``spec`` cannot be used, or it has fewer sites than ``min-sites``.
    """
    manifest = prepare_data(spec, out.resolve() / "data", n_sites, settings.seed)
    check_site_count(len(manifest.sites), settings)
    return manifest
