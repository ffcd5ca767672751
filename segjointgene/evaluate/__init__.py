"""Scoring segmentations: metrics, baselines, simulated sections with truth."""
