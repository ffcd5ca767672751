"""The segmentation methods: how one is chosen, the spot-model engine, the published self-training (SegJointGene) and the tiled run of whole slides."""
