"""Sweeps: a benchmark grid from one TOML file, planned and executed locally or on Ray."""
