"""The secagg part of ``fedadapt bench``: one secure sum's cost, its error within the bound."""

from __future__ import annotations

from bench.secure import VALUES, secure_sum_cost


def test_a_secure_sums_figures_with_every_site_and_with_a_ring() -> None:
    """Every other site as neighbour, then SecAgg+'s ring: the total within its bound."""
    for sites, ring in ((4, 0), (9, 4)):
        cost = secure_sum_cost(sites, ring)
        assert cost["sites"] == sites and cost["neighbours"] == (ring or sites - 1)
        assert cost["values"] == VALUES == 1327
        assert 0 <= cost["max_error"] <= cost["error_bound"] < 1e-6
        # Each site sends and receives at least its masked vector (8 bytes a value).
        assert cost["bytes_per_site"] > 8 * VALUES and cost["cpu_s"] > 0
