"""Attack 7: entries deleted or edited by hand in a site's audit log are found."""

from __future__ import annotations

import json
from pathlib import Path

from client.audit_log import verify_chain
from drills.curious import World, base_config, deployed_site


def test_an_edited_or_deleted_entry_breaks_the_chain_at_its_line(
    world: World, tmp_path: Path
) -> None:
    """A real site's log: intact; a reply's value edited; a reply deleted."""
    site = deployed_site(tmp_path / "site", world.without)
    for _ in range(3):
        site.ask("stats", base_config(world.schema))
    log = site.site_dir / "audit.jsonl"
    check = verify_chain(site.site_dir)
    assert check.ok and check.entries == len(log.read_text().splitlines())
    lines = log.read_text().splitlines()
    replies = [i for i, line in enumerate(lines) if '"phase":"stats"' in line]
    edited = json.loads(lines[replies[1]])
    edited["bytes"] += 1
    log.write_text("\n".join([*lines[:replies[1]], json.dumps(edited, separators=(",", ":")),
                              *lines[replies[1] + 1:]]) + "\n")
    assert verify_chain(site.site_dir).line == replies[1] + 2  # the entry after it
    log.write_text("\n".join(lines[:replies[0]] + lines[replies[0] + 1:]) + "\n")
    broken = verify_chain(site.site_dir)
    assert not broken.ok and broken.line == replies[0] + 1
