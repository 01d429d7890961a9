"""Schedulers: which requests run each step and with how many tokens."""
