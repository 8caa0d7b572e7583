"""Feature groups: the sites that measure the same site-only features, and their shared extension.

Sites that measure the same site-only feature form a group, known to the coordinator from the
feature names each site declares in the stats phase (never values). Features measured by
exactly the same sites form one group together; a site measuring two features that other
sites measure separately belongs to two groups. A group needs at least ``min-group-sites``
members: a group of one is no group (its "group" model would be one site's own fit, sent out).

Each group trains a **group extension** by Newton's method over its members only, with the
frozen source model's logit as the offset:

    logit_group(x) = logit_source(x_shared) + [x_shared_inputs, group_inputs] . w + b

where ``group_inputs`` are the group's features preprocessed with the group's own merged
statistics (like the shared features'). A member site may then choose it, or it with a
private correction on top, as its final model (``client.adapt``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from shared.preprocessing import TabularPreprocessor
from shared.schema import Feature

# The name of the config entry of a group training round, and of the adapt message's groups.
GROUP = "group"
GROUPS = "groups"
# The key of the frozen source model's arrays in a group training message.
SOURCE_ARRAYS = "source"
# Largest group evidence (a mean log-loss gain per row, and its spread) that is sent and used.
MAX_PRIOR = 10.0


def group_name(features: Sequence[str]) -> str:
    """A feature group's name: its features joined by '+'."""
    return "+".join(features)


@dataclass(frozen=True)
class Group:
    """Sites measuring the same site-only features.

    Attributes
    ----------
    features : tuple of str
        The group's features, in the schema's order.
    members : tuple of str
        Its sites' names, sorted.
    """

    features: tuple[str, ...]
    members: tuple[str, ...]

    @property
    def name(self) -> str:
        """How messages and the report call it: its features joined by '+'."""
        return group_name(self.features)


def form_groups(site_features: Mapping[str, Sequence[str]], min_sites: int,
                order: Sequence[str] = ()) -> list[Group]:
    """The feature groups of a federation, from the feature names each site measures.

    Parameters
    ----------
    site_features : mapping
        Per site name, the names of its site-only features.
    min_sites : int
        Fewest members a group needs (a group of one is never a group; 0 or 1 count as 2).
    order : sequence of str
        The schema's feature order (features not in it sort after, by name).

    Returns
    -------
    list of Group
        One per set of features measured by exactly the same sites, with at least
        ``max(2, min_sites)`` of them, sorted by features.
    """
    need = max(2, int(min_sites))
    measured: dict[str, set[str]] = {}
    for site, names in site_features.items():
        for feature in names:
            measured.setdefault(feature, set()).add(site)
    rank = {name: i for i, name in enumerate(order)}
    by_members: dict[tuple[str, ...], list[str]] = {}
    for feature, sites in measured.items():
        if len(sites) >= need:
            by_members.setdefault(tuple(sorted(sites)), []).append(feature)
    groups = [Group(tuple(sorted(f, key=lambda n: (rank.get(n, len(rank)), n))), members)
              for members, f in by_members.items()]
    return sorted(groups, key=lambda g: (len(g.features), [rank.get(n, len(rank)) for n in
                                                            g.features], g.features))


@dataclass(frozen=True)
class Extension:
    """A trained group extension, as a member site applies it.

    Attributes
    ----------
    features : tuple of str
        The group's features.
    preprocessing : dict
        The group features' preprocessing (``TabularPreprocessor.to_dict``).
    theta : numpy.ndarray
        Weights of ``[shared inputs, group inputs]``, then the intercept.
    members : int
        How many sites trained it.
    rows : int
        Their training rows (as the sites reported them).
    prior_gain, prior_sd : float or None
        The group's evidence for the extension: the mean log-loss gain over the source model
        across its members' training rows (less the fit's expected optimism) and the spread
        of that gain between members (``client.adapt`` shrinks a site's own estimate
        towards it). None when the group has no such evidence.
    """

    features: tuple[str, ...]
    preprocessing: dict[str, Any]
    theta: np.ndarray
    members: int = 0
    rows: int = 0
    prior_gain: float | None = None
    prior_sd: float | None = None

    @property
    def name(self) -> str:
        """The group's name."""
        return group_name(self.features)

    def preprocessor(self, defs: Sequence[Feature]) -> TabularPreprocessor:
        """The group features' preprocessing, rebuilt for their definitions."""
        return TabularPreprocessor.from_dict(self.preprocessing, list(defs))

    def logit(self, x_shared: np.ndarray, rows: pd.DataFrame, defs: Sequence[Feature],
              bound: float = np.inf) -> np.ndarray:
        """The extension's part of the logit for rows (the source logit not included).

        Parameters
        ----------
        x_shared : numpy.ndarray
            The source model's inputs of the rows.
        rows : pandas.DataFrame
            The rows' columns of the group's features.
        defs : sequence of Feature
            Their definitions, in the group's order.
        bound : float
            Every group input is clipped into ``[-bound, bound]`` (the site's input bound).
        """
        return inputs(x_shared, rows, self.preprocessor(defs), bound) @ self.theta[:-1] + float(
            self.theta[-1])

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able state (sent in the adapt message, sealed with a site's model)."""
        return {"features": list(self.features), "preprocessing": self.preprocessing,
                "theta": [float(v) for v in self.theta], "members": self.members,
                "rows": self.rows, "prior_gain": self.prior_gain, "prior_sd": self.prior_sd}

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> Extension:
        """Rebuild from :meth:`to_dict` (the caller checks the numbers)."""
        return cls(tuple(str(f) for f in state["features"]), dict(state["preprocessing"]),
                   np.asarray(state["theta"], dtype=np.float64), int(state.get("members", 0)),
                   int(state.get("rows", 0)), _number(state.get("prior_gain")),
                   _number(state.get("prior_sd")))


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


def group_prior(initial: Mapping[Any, tuple[float, int]], final: Mapping[Any, tuple[float, int]],
                parameters: int) -> tuple[float | None, float | None]:
    """The group's evidence for its extension, from the loss sums its members already sent.

    Parameters
    ----------
    initial, final : mapping
        Per member, its loss sum and rows at the start (the source model itself) and at the
        extension's final weights (Newton's replies).
    parameters : int
        The extension's parameters: its fit's expected optimism over all the group's rows is
        half of them (in nats, as in Akaike's criterion), taken off each member's gain in
        proportion to its rows.

    Returns
    -------
    float or None, float or None
        The members' mean gain per row (each member counted once) and the standard deviation
        of their gains (None with
        fewer than two members answering both, or numbers outside ``MAX_PRIOR``).
    """
    both = [k for k in initial if k in final and initial[k][1] > 0]
    if len(both) < 2:
        return None, None
    gains = np.array([(initial[k][0] - final[k][0]) / initial[k][1] for k in both])
    rows = float(sum(initial[k][1] for k in both))
    # A typical member's gain: every site counts once, so a large member, to whose rows the
    # extension is fitted most closely, does not speak for the small ones. Each member's
    # rows carry about their share of the fit's optimism: half the parameters over all rows.
    mean = float(np.mean(gains) - 0.5 * parameters / rows)
    spread = float(np.std(gains, ddof=1))
    if not (abs(mean) <= MAX_PRIOR and 0.0 < spread <= MAX_PRIOR):  # noisy or absurd sums
        return None, None
    return mean, spread


def inputs(x_shared: np.ndarray, rows: pd.DataFrame, prep: TabularPreprocessor,
           bound: float = np.inf) -> np.ndarray:
    """A group extension's inputs: the source model's inputs, then the group features'."""
    own = np.clip(prep.transform(rows[list(f.name for f in prep.features)]), -bound, bound)
    return np.hstack([np.asarray(x_shared, dtype=np.float64), own])


def extensions_json(extensions: Sequence[Extension]) -> str:
    """The adapt message's ``groups`` entry."""
    return json.dumps([e.to_dict() for e in extensions])
