"""Named device behaviours a device tree can choose (``behaviour = "..."``).

Lives here: ``BEHAVIOURS`` (name -> factory taking the ``PciDev``) and
``make_behaviour``. "ram" is the default (``RamBars``: BARs remember what is
written); "dma-engine" is ``DmaEngine`` (a copy/fill engine in BAR0 that does
DMA through the IOMMU, see ``dma_engine.py``).
"""

from __future__ import annotations

from collections.abc import Callable

from fakedev.kernel.pci import PciDev

from .dma_engine import DmaEngine
from .vfio_pci_rdwr import BarBehaviour, RamBars

BEHAVIOURS: dict[str, Callable[[PciDev], BarBehaviour]] = {
    "ram": RamBars,
    "dma-engine": DmaEngine,
}


def make_behaviour(name: str, pdev: PciDev) -> BarBehaviour:
    """A new behaviour ``name`` for ``pdev``; KeyError for an unknown name."""
    return BEHAVIOURS[name](pdev)
