#!/usr/bin/env bash
# Create (or reuse) the project-local virtual environment .venv with everything ns_extreme needs.
#   bash scripts/setup.sh          runtime: torch, nerfstudio 1.1.5, ns_extreme (editable)
#   bash scripts/setup.sh --dev    plus the test tools (pytest) and headless Chromium for viewer tests
# Re-running is cheap: nothing is reinstalled while pyproject.toml and this script are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

dev=0
[ "${1:-}" = "--dev" ] && dev=1
venv="${NS_EXTREME_VENV:-.venv}"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }
apt_install() {
    command -v apt-get >/dev/null || return 1
    as_root apt-get update -qq >/dev/null && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# open3d (imported by nerfstudio's ns-process-data and PLY loading) needs libusb-1.0.so.0.
if ! ldconfig -p 2>/dev/null | grep -q 'libusb-1.0.so.0'; then
    apt_install libusb-1.0-0 || echo "setup: warning: could not install libusb-1.0-0; nerfstudio's ns-process-data needs it" >&2
fi
if [ "$dev" = 1 ] && ! command -v chromium >/dev/null; then
    apt_install chromium || echo "setup: warning: could not install chromium; browser tests will be skipped" >&2
fi

# PyPI's torchvision is a CUDA build that fails to import beside a CPU-only torch ("torchvision::nms does
# not exist"), so torch and torchvision are installed as a matching pair.
case "$(uname -m)" in
    x86_64) torch_pins=("torch==2.14.1" "torchvision==0.29.1") ;;
    aarch64 | arm64) torch_pins=("torch==2.9.1" "torchvision==0.24.1") ;;
    *) torch_pins=("torch" "torchvision") ;;
esac
extras=""
[ "$dev" = 1 ] && extras="[dev]"

stamp="$venv/.ns_extreme-installed$extras"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
echo "setup: installing into $venv (first run takes a few minutes) ..." >&2
"$venv/bin/python" -m pip install -q "${torch_pins[@]}" -e ".$extras"
echo "$want" > "$stamp"
