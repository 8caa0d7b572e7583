"""The site's own executor (``fedadapt site-exec``): runs only the app bundles its policy approves.

A site installs and trusts this code; ``client`` is the code the coordinator ships to it inside
the app bundle. Imports ``client`` (the policy, the audit log) and ``shared``, nothing else.
"""
