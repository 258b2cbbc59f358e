"""The one place quantlm's version is stated (pyproject.toml reads it)."""

__version__ = "0.1.0"
