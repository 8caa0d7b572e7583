"""What both sides agree on: site names that every report, folder and error reply can carry."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.site import SiteConfigError, read_manifest, resolve_site
from server.certs import site_names
from shared.protocol import site_name_problem


@pytest.mark.parametrize("name", ["north", "hospital-a", "site_7", "A.b-c", "x" * 64])
def test_plain_names_are_site_names(name: str) -> None:
    """Letters, digits, '.', '_' and '-' (up to 64, not starting with a dot or dash)."""
    assert site_name_problem(name) is None


@pytest.mark.parametrize("name", ["", "weird[red]", "a/b", "../x", ".hidden", "-x", "a b",
                                  "x" * 65, "nörd"])
def test_other_names_are_refused_everywhere(name: str, tmp_path: Path) -> None:
    """The manifest, a SuperNode's node_config and `fedadapt certs` all refuse them."""
    assert site_name_problem(name)
    manifest = tmp_path / "sites.toml"
    manifest.write_text(f'schema = "synthetic"\n[[sites]]\nname = "{name}"\ndata-file = "a.csv"\n')
    with pytest.raises(SiteConfigError, match="not allowed"):
        read_manifest(manifest)
    with pytest.raises(SiteConfigError, match=r"not allowed|but not site-name"):
        resolve_site({"data-file": "a.csv", "site-dir": "d", "site-name": name}, {})
    with pytest.raises(ValueError, match="not allowed"):
        site_names(1, [name])


def test_certs_refuse_a_name_twice() -> None:
    """Two sites with one name would share a key folder and a report entry."""
    with pytest.raises(ValueError, match="its own name"):
        site_names(2, ["north", "north"])
