"""Input/output: image reading and preprocessing, COLMAP, transforms.json, PLY and depth files."""
