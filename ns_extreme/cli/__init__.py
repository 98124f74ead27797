"""Console scripts of ns_extreme (e.g. ``ns-extreme-align`` in ``ns_extreme.cli.align``)."""
