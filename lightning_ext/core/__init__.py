"""Mechanics every family shares: checkpoint reading, strategy guards, input resolution, MACs and latency
measurement, plotting, seeded samplers, run paths, validation, optional imports, lazy exports, distributed helpers.

Nothing here imports a family; every family may import from here."""
