"""The Linux dom0 platform (platform.py), its ops inside dom0 (dom0.py), its fault
actions (faults.py) and the Linux guest (guest.py)."""
