"""Viewers: the "Extreme poses" panel (nerfstudio's viewer and ``ns-extreme-view``) and the eval pair browser.

* ``scene_data``: reads a dataset folder into ``SceneData`` (cameras, confidence, refinement, points).
* ``frames``: where the model world lands in viser's world (standalone or nerfstudio's training frame).
* ``colors``: per-view confidence colours and their legend; ``images``: thumbnails for the panels.
* ``frusta`` / ``point_layers``: the scene nodes; ``panel_text``: the panel's markdown; ``panel``: the GUI
  folder that ties them together, shared by both viewers.
* ``standalone``: ``ns-extreme-view DIR`` (no nerfstudio import).
* ``pairs_browser``: ``ns-extreme-align eval --view`` / ``ns-extreme-view report.json``.

Nothing is imported here, so ``import ns_extreme.viewer`` stays cheap.
"""
