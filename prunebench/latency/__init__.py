"""The latency protocol: measured speed-ups, separate from the accuracy run (docs/latency.md)."""
