"""A deployed site's folder, made once: its keys, its split secret, its policy, its audit log."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from client.audit_log import audit_path, record_event
from client.correction_store import key_path
from client.policy import DEPLOYED, policy_text, read_policy
from client.site import SiteConfigError
from client.split import SPLIT_KEY, split_key
from shared.crypto import key_id, load_or_create_key
from shared.files import create_private_file, ensure_private_dir
from shared.protocol import site_name_problem

POLICY_FILE = "policy.toml"


@dataclass(frozen=True)
class SiteFolder:
    """What ``init-site`` made or found: the folder and the files it holds."""

    site_dir: Path
    name: str
    policy: Path
    created: tuple[str, ...]

    def node_config(self, data_file: str = "/data/export.csv") -> str:
        """The SuperNode's ``--node-config`` value for this site."""
        return (f'data-file="{data_file}" site-dir="{self.site_dir}" site-name="{self.name}" '
                f'policy="{self.policy}"')


def init_site(site_dir: str | Path, name: str) -> SiteFolder:
    """Make a deployed site's folder (0700), keeping whatever it already holds.

    It holds ``site.key`` (seals the site's corrections), ``split.key`` (the secret that
    decides which rows are held out), ``policy.toml`` (the deployment's safe defaults, every
    rule written out: differential privacy required, finite budgets) and ``audit.jsonl``,
    whose first entry records the set-up. Existing keys and policy are never replaced.

    Parameters
    ----------
    site_dir : str or Path
        The site's private folder.
    name : str
        The site's name (its ``site-name``, the name its key was registered with).

    Returns
    -------
    SiteFolder
        The folder, the policy file, and which files were created now.

    Raises
    ------
    client.site.SiteConfigError
        If the name is not a valid site name.
    client.policy.PolicyError
        If an existing policy file cannot be used.
    """
    problem = site_name_problem(name)
    if problem:
        raise SiteConfigError(f"--name: {problem}")
    folder = ensure_private_dir(Path(site_dir).expanduser().resolve())
    created = [p.name for p in (key_path(folder), folder / SPLIT_KEY, folder / POLICY_FILE,
                                audit_path(folder)) if not p.exists()]
    site_key = load_or_create_key(key_path(folder))
    secret = split_key(folder)
    policy = folder / POLICY_FILE
    if not policy.exists():
        create_private_file(policy, policy_text(DEPLOYED).encode("utf-8"))
    read_policy(policy)  # an existing policy must be usable
    if "audit.jsonl" in created:
        record_event(folder, "site-init", site=name, site_key=key_id(site_key),
                     split_key=key_id(secret))
    return SiteFolder(folder, name, policy, tuple(created))
