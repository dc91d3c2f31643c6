"""Defaults the CLI shows in ``--help``, kept apart from the modules they configure so that
``python -m petdet_tasks`` starts without importing numpy, Pillow or the HTTP client (a few
hundred ms on every command). The modules re-export them under their old names."""

OFFICIAL_BASE = "https://thor.robots.ox.ac.uk/~vgg/data/pets/"  # the dataset's home

SAMPLE_BREEDS = 6
SAMPLE_PER_BREED = 12
SAMPLE_SEED = 0
