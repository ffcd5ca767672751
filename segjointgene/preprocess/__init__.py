"""Sections into patches: spot densities, nucleus seeds, the patch grid and the patch dataset."""
