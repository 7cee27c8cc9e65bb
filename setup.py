"""Zarkov's packaging is in pyproject.toml (PEP 621); this file is for tools that
still call setup.py."""
from setuptools import setup

setup()
