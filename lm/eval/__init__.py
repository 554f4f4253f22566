"""Evaluation: protocols (REFERENCE §6) and evaluation drivers."""
