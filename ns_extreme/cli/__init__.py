"""Console scripts of ns_extreme (``ns-extreme-align`` in ``ns_extreme.cli.align``)."""
