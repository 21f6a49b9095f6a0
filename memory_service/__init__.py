"""The Engram table service: rows, shards, tiers. Never imports `trainer`."""
