"""``ns-extreme-view DIR``: the "Extreme poses" viewer on a dataset folder, without nerfstudio training.

``DIR`` is a folder written by ``ns-process-data extreme-poses`` (or its transforms.json, or any
nerfstudio-style dataset folder); an ``ns-extreme-align eval`` report (its report.json or output folder)
opens the pair browser instead. The server listens on the loopback interface unless ``--host`` says
otherwise, and runs until Ctrl-C.

Kept light: no torch / nerfstudio import on the normal path (start-up time is the viewer's). Errors and exit
codes follow ``ns_extreme.cli.runtime`` like every ns_extreme command; Ctrl-C (or SIGTERM) is the normal way
to stop the server and exits with 0.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import tyro

from ns_extreme.cli.runtime import run_cli
from ns_extreme.viewer.standalone import DEFAULT_HOST, DEFAULT_PORT


@dataclass
class View:
    """Show an extreme-poses dataset in the browser: camera frusta coloured by confidence (click one for its
    image and numbers), the point cloud with confidence-percentile and point-size sliders, the
    pretrained/aligned pose toggle (datasets written with --compare-pretrained) and the per-pair
    relative-rotation table. Given an `ns-extreme-align eval` report.json (or its folder), browse the
    evaluated pairs instead."""

    path: tyro.conf.Positional[Path]
    """Dataset folder (from ns-process-data extreme-poses), its transforms.json, or an eval report.json."""
    port: int = DEFAULT_PORT
    """Port to serve on (the next free one is used if it is taken)."""
    host: str = DEFAULT_HOST
    """Interface to listen on: 127.0.0.1 (this machine only) or 0.0.0.0 (every interface: anyone who can
    reach this machine can open the viewer)."""
    verbose: bool = False
    """Print tracebacks with errors."""

    def start(self):
        """Start the server and return the running viewer (does not block)."""
        from ns_extreme.viewer.pairs_browser import is_report, start_pairs_browser
        from ns_extreme.viewer.standalone import start_viewer

        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in 0..65535, got {self.port}")
        try:
            if is_report(self.path):
                return start_pairs_browser(self.path, self.host, self.port)
            return start_viewer(self.path, self.host, self.port)
        except RuntimeError as exc:  # viser: "Failed to bind ..." (an address this machine does not have)
            if "bind" not in str(exc):
                raise
            raise OSError(f"--host {self.host} --port {self.port}: {exc}") from exc

    def main(self) -> None:
        from ns_extreme.viewer.standalone import wait_forever

        t0 = time.perf_counter()
        with self.start() as viewer:
            if self.port and viewer.port != self.port:
                print(f"port {self.port} is taken; using {viewer.port}")
            if viewer.panel is not None:
                s = viewer.panel.state()
                what = (
                    f"{s['frusta']} cameras, {s['points_total']:,} points, {s['pairs']:,} pairs, "
                    f"pose sets: {', '.join(s['pose_sets'])}"
                )
            else:
                what = f"{len(viewer.browser.pairs):,} evaluated pairs"
            print(f"{what}; ready in {time.perf_counter() - t0:.1f} s")
            print(f"viewer: {viewer.url}  (Ctrl-C to stop)", flush=True)
            if self.host in ("0.0.0.0", "::"):
                print("note: listening on every interface; anyone who can reach this machine can open the viewer")
            wait_forever()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), serve until stopped; returns the exit code."""
    return run_cli(View, argv)


def entrypoint() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entrypoint()
