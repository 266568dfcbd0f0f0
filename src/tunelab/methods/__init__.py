"""Adaptation methods, one module each; every module registers itself in `registry`."""
