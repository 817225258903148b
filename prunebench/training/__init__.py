"""Training: the device-resident engine, the streamed loop, precision, threads, resumable stages, DDP."""
