"""What a run is: its configuration and identity, the named budgets, the per-layer ratio profiles."""
