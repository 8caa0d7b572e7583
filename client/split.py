"""A site's split of its rows into training and held-out sets: keyed at a deployed site."""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.data import DataError, Problem, SiteData

log = logging.getLogger(__name__)

PROTOCOLS = ("default", "flamby")
FLAMBY_TRAIN_FRACTION = 0.66
SPLIT_KEY = "split.key"


@dataclass(frozen=True)
class Split:
    """Row indices (into the site's usable rows) of the training and held-out sets."""

    train: np.ndarray
    test: np.ndarray


def protocol_rows(data: SiteData, protocol: str) -> np.ndarray:
    """Return the rows a protocol keeps.

    Parameters
    ----------
    data : SiteData
        The validated site file.
    protocol : {"default", "flamby"}
        ``default`` keeps every row (missing values are imputed later). ``flamby`` reproduces
        FLamby's Fed-Heart-Disease rows: a row with a missing marker in any shared feature is
        dropped (missing codes such as cholesterol 0 are not markers, so those rows stay,
        as in FLamby).

    Returns
    -------
    numpy.ndarray
        Indices of the kept rows.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
    if protocol == "default":
        return np.arange(data.n_rows)
    # Only shared features count: FLamby drops slope, ca and thal before dropping rows.
    marked = data.marked_missing[list(data.shared_columns)].to_numpy()
    return np.flatnonzero(~marked.any(axis=1))


def split_site(
    data: SiteData, *, protocol: str = "default", seed: int = 42, test_fraction: float = 0.3
) -> Split:
    """Split a site's rows into training and held-out sets, the same way for the whole run.

    Parameters
    ----------
    data : SiteData
        The validated site file.
    protocol : {"default", "flamby"}
        ``flamby`` keeps FLamby's rows (see :func:`protocol_rows`) and its split: 66 % train,
        scikit-learn's ``train_test_split`` with ``random_state=seed`` (FLamby uses 43),
        stratified when both classes have more than two rows.
    seed : int
        Random state of the split.
    test_fraction : float
        Held-out fraction under the default protocol (stratified when each class has at
        least two rows).

    Returns
    -------
    Split
        Indices into the site's rows.
    """
    # Imported here: scikit-learn is slow to import, and a site caches its split (see
    # client.jobs) so that training rounds, each a fresh process, do not pay for it.
    from sklearn.model_selection import train_test_split

    rows = protocol_rows(data, protocol)
    if len(rows) < 2:
        absent = [c for c in data.shared_columns if not data.summary[c].present]
        why = f" (the file has no column {', '.join(map(repr, absent))})" if absent else ""
        raise DataError([Problem(
            str(data.path), 0, 0, "",
            f"protocol {protocol!r} keeps only rows with every shared feature present: "
            f"{len(rows)} row(s) left{why}",
        )], "use the default protocol, which imputes missing values")
    y = data.label[rows]
    counts = np.bincount(y, minlength=2)
    if protocol == "flamby":
        stratify = y if counts.min() > 2 else None
        train, test = train_test_split(
            np.arange(len(rows)),
            test_size=1.0 - FLAMBY_TRAIN_FRACTION,
            train_size=FLAMBY_TRAIN_FRACTION,
            random_state=seed,
            shuffle=True,
            stratify=stratify,
        )
    else:
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test-fraction must be between 0 and 1, got {test_fraction}")
        stratify = y if counts.min() >= 2 else None
        train, test = train_test_split(
            np.arange(len(rows)), test_size=test_fraction, random_state=seed, shuffle=True,
            stratify=stratify,
        )
    log.debug("split: %d train, %d held-out rows", len(train), len(test))
    return Split(train=np.sort(rows[train]), test=np.sort(rows[test]))


def split_key(site_dir: str | Path) -> bytes:
    """The site's secret split key (``site-dir/split.key``, 0600), created once.

    Only the site knows it, so no value the coordinator sends can choose which rows are
    held out. Losing it re-draws the split (held-out rows may then be trained on).
    """
    from shared.crypto import load_or_create_key

    return load_or_create_key(Path(site_dir) / SPLIT_KEY)


def keyed_split(data: SiteData, key: bytes, test_fraction: float, protocol: str = "default"
                ) -> Split:
    """A deployed site's split: each row held out by a keyed hash of its own cells.

    Row ``i`` is held out when ``HMAC-SHA256(key, row_digests[i])``, read as a number in
    [0, 1), is below ``test_fraction``. A row's side depends on that row alone: a patient
    added to the file leaves every other row where it was, so two versions of the file never
    give training sets that differ by more than their added or removed rows, and a held-out
    patient stays held out (the differential-privacy accounting counts on the first; the
    honest evaluation on the second). The held-out share is ``test_fraction`` on average,
    not exactly, and not stratified. Under ``protocol = "flamby"`` the rows FLamby keeps are
    split the same way.

    Parameters
    ----------
    data : SiteData
        The validated file (with its ``row_digests``).
    key : bytes
        The site's secret (:func:`split_key`).
    test_fraction : float
        The site's held-out share.
    protocol : {"default", "flamby"}
        Which rows take part (:func:`protocol_rows`).

    Returns
    -------
    Split
        Indices into the site's rows.
    """
    rows = protocol_rows(data, protocol)
    if len(data.row_digests) != data.n_rows:
        raise ValueError("the site data carry no row digests: read them with client.data")
    scale = float(2 ** 64)
    held = np.array([
        int.from_bytes(hmac.new(key, data.row_digests[i], hashlib.sha256).digest()[:8], "big")
        / scale < test_fraction for i in rows], dtype=bool)
    log.debug("keyed split: %d train, %d held-out rows", int((~held).sum()), int(held.sum()))
    return Split(train=np.sort(rows[~held]), test=np.sort(rows[held]))
