"""Free space under storage.root against the configured reserve (`storage.reserve`).

Below the reserve the listener refuses new associations as transient, so senders retry later
instead of having writes fail half-way; what is already in flight may use the reserve.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ie_gateway.config import Reserve

GB = 1024**3


@dataclass(frozen=True)
class DiskSpace:
    """One reading of the filesystem holding storage.root."""

    free_bytes: int
    total_bytes: int
    reserve_bytes: int

    @property
    def below_reserve(self) -> bool:
        return self.free_bytes < self.reserve_bytes

    @property
    def shortfall_bytes(self) -> int:
        """How much must be freed to get back above the reserve."""
        return max(0, self.reserve_bytes - self.free_bytes)


def reserve_bytes(reserve: Reserve, total_bytes: int) -> int:
    """The floor: the larger of ``percent`` of the filesystem and ``gb``."""
    return max(int(total_bytes * reserve.percent / 100), int(reserve.gb * GB))


def disk_space(root: Path, reserve: Reserve) -> DiskSpace:
    """Measure now (statvfs: space available to this unprivileged-or-not process)."""
    st = os.statvfs(root)
    total = st.f_blocks * st.f_frsize
    return DiskSpace(
        free_bytes=st.f_bavail * st.f_frsize, total_bytes=total, reserve_bytes=reserve_bytes(reserve, total)
    )
