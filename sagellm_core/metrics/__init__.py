"""Metric sinks: consumers of per-step and per-request events."""
