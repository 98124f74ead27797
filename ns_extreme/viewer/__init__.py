"""Viewers: the "Extreme poses" panel (nerfstudio's viewer and ``ns-extreme-view``) and the eval pair browser.

* ``scene``: loads an extreme-poses dataset folder and builds the scene nodes + GUI panel on any
  ``viser.ViserServer`` (a plain one, or nerfstudio's, given the display frame). Shared by both viewers.
* ``standalone``: ``ns-extreme-view DIR`` (no nerfstudio import).
* ``pairs_browser``: ``ns-extreme-align eval --view`` / ``ns-extreme-view report.json``.

Nothing is imported here, so ``import ns_extreme.viewer`` stays cheap.
"""
