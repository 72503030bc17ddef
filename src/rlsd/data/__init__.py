"""Datasets, their formats, GSM-Symbolic templates and reward functions."""
