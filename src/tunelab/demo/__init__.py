"""Packaged demo data: a small English sentiment set (SST-2 sample), used when no data is given.

Built by scripts/make_demo.py; see README.md in this folder for the source and license.
"""
