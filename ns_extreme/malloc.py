"""Process-wide tuning of glibc's allocator for workloads of many short-lived, multi-MB tensors."""

from __future__ import annotations


def return_freed_memory_to_os(threshold_bytes: int = 1 << 20) -> bool:
    """Serve allocations of ``threshold_bytes`` or more with their own memory maps (glibc ``M_MMAP_THRESHOLD``).

    glibc's default keeps freed multi-MB tensors in its heap when a longer-lived allocation sits above them, so
    the resident set grows block after block although the live tensors do not: measured on a 6-block
    VGGT, a checkpointed training forward peaked 1.08 GB above the model instead of 0.34 GB, an inference
    forward 0.29 GB instead of 0.14 GB. With this, freed tensors go back to the OS at once (cost: page
    faults on fresh allocations, ~2 % of a CPU forward).

    A process-wide setting: the console scripts call it at start-up; library users decide for their own
    process. Idempotent; a no-op (False) off glibc.
    """
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_mmap_threshold = -3
        return bool(libc.mallopt(m_mmap_threshold, int(threshold_bytes)))
    except (OSError, AttributeError):
        return False
