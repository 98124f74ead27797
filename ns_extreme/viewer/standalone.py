"""``ns-extreme-view DIR``: the "Extreme poses" scene and panel on a plain viser server (no nerfstudio).

``start_viewer`` loads the dataset, starts the server and builds the panel, and returns at once (the server
runs in viser's threads); ``wait_forever`` blocks until Ctrl-C. The default host is the loopback interface:
pass ``--host 0.0.0.0`` to let other machines connect.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ns_extreme.viewer.frames import standalone_frame
from ns_extreme.viewer.panel import ExtremePanel
from ns_extreme.viewer.scene_data import load_scene

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080


@dataclass
class RunningViewer:
    server: Any
    """The viser.ViserServer."""
    host: str
    port: int
    """The port actually bound (viser moves on to the next free port when the one asked for is taken)."""
    timings_s: dict[str, float] = field(default_factory=dict)
    panel: Optional[ExtremePanel] = None
    browser: Any = None
    """The pairs browser, for report viewers."""

    @property
    def url(self) -> str:
        host = "localhost" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    def stop(self) -> None:
        self.server.stop()

    def __enter__(self) -> "RunningViewer":
        return self

    def __exit__(self, *exc: object) -> None:
        # viser's threads are not daemons: a server left running would keep the process alive after Ctrl-C.
        self.stop()


def start_server(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, label: Optional[str] = None) -> tuple[Any, int]:
    import viser

    for attempt in range(5):
        try:
            server = viser.ViserServer(host=host, port=port, label=label, verbose=False)
            break
        except Exception as exc:  # noqa: BLE001
            # viser 0.2.7 scans every process's cwd at start-up (looking for `yarn start`) and does not catch
            # psutil.NoSuchProcess when one exits meanwhile; nothing is bound yet at that point, so just retry.
            if type(exc).__name__ != "NoSuchProcess" or attempt == 4:
                raise
    server.gui.configure_theme(
        control_layout="collapsible", control_width="large", dark_mode=False, show_share_button=False
    )
    return server, int(server.get_port())


def start_viewer(dataset: str | Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> RunningViewer:
    """Load ``dataset`` (a folder written by ``ns-process-data extreme-poses``), serve it, return at once."""
    t0 = time.perf_counter()
    data = load_scene(dataset)
    t1 = time.perf_counter()
    server, bound = start_server(host, port, label=f"ns_extreme · {Path(data.root).name}")
    t2 = time.perf_counter()
    try:
        panel = ExtremePanel(server, data, standalone_frame(data), set_initial_camera=True)
    except BaseException:
        server.stop()
        raise
    t3 = time.perf_counter()
    timings = {"load_s": t1 - t0, "server_s": t2 - t1, "scene_s": t3 - t2, "total_s": t3 - t0}
    return RunningViewer(server=server, host=host, port=bound, timings_s=timings, panel=panel)


def wait_forever(sleep: Callable[[float], None] = time.sleep) -> None:
    """Block until Ctrl-C, a normal way to leave a viewer: returns quietly (viser 0.2.7 has no
    ``sleep_forever``). Serve inside ``with viewer:`` so that the server stops however the block ends."""
    try:
        while True:
            sleep(3600.0)
    except KeyboardInterrupt:
        pass
