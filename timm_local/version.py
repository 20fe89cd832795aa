"""The package version, in one place (read by the package, the exports and pyproject)."""
__version__ = "0.1.0"
