"""The Engram table service: rows, shards, tiers. Never imports `trainer`."""
from importlib.metadata import PackageNotFoundError, version

try:  # single source: pyproject.toml's [project] version, through the installed metadata
    __version__ = version("engram-memory")
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"
