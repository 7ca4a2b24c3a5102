"""Privacy building blocks: pseudonymisation of identifiers (and, later, the release guard)."""
