"""Regate's version: the one place it is written (pyproject.toml reads it from here).

`regate --version`, `/healthz`, the `regate_build_info` metric and the decision
logs' `labels.version` all show this string.
"""

__version__ = "0.1.0"
