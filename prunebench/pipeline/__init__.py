"""One run of the protocol: baseline, calibration, compress, one-shot, fine-tune, record."""
