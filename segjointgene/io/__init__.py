"""Reading sections and instrument folders; writing results files (layer 1: no torch)."""
