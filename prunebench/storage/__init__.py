"""Safe storage: atomic file writes, advisory locks, checked checkpoint loading."""
