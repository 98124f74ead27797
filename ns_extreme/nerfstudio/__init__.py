"""nerfstudio integration: the ``extreme3d`` dataparser and the ``ns-process-data extreme-poses`` command.

Nothing is imported here on purpose: nerfstudio loads ``ns_extreme.nerfstudio.dataparser_spec`` (entry
point ``nerfstudio.dataparser_configs``) while it is still importing itself, so this package must stay
free of heavy or nerfstudio-config imports (see the import-order trap in docs).
"""
