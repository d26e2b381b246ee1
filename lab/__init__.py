"""xen-blklab: an end-to-end lab for Xen's paravirtual block path under QEMU."""

__version__ = "0.1.0"
