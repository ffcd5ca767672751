"""From labels to what users load: stitching, export, gene rankings, figures."""
