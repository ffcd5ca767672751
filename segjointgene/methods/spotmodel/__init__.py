"""The spot-model engine: per-cell spot model (EM), pixel partition, density cells."""
