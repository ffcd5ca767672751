"""Whole slides tile by tile on Dask: plan, tiles, the tile network, the merge."""
