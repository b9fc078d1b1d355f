"""Sandrun: anonymous, ephemeral, sandboxed code execution."""

__version__ = "0.1.0"
