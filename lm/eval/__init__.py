"""Evaluation drivers: ``lm evaluate`` (clean vs corrupted tables). The batch protocols are ``lm.data.protocols``."""
