"""The federation: a coordinator that takes adapters from donors, evaluates them blind, merges the accepted ones
exactly and publishes versioned releases that credit their contributors (see docs/federation.md)."""
