"""The federation: a coordinator that takes adapters from donors, evaluates them blind, merges the accepted ones
exactly and publishes versioned releases that credit their contributors (see docs/federation.md)."""

from collections.abc import Callable

# How the federation's library code reports progress: one line at a time, to whatever the caller passes (the CLI
# prints it to stderr; tests and the demo collect it).
Report = Callable[[str], None]
