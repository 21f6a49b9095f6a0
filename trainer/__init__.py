"""The model side: tokenizer compression, N-gram hashing, the Engram module, training."""
from importlib.metadata import PackageNotFoundError, version

try:  # single source: pyproject.toml's [project] version (one distribution ships both packages)
    __version__ = version("engram-memory")
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"
