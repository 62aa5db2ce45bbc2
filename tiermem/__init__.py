"""tiermem: tiered memory for virtual machine fleets.

Cold guest pages are found with userfaultfd read-write protection (RWP, or its
MINOR-fault emulation on stock kernels), moved to a page store (local directory,
Redis or S3) and brought back on the guest's next touch.
"""

__version__ = "0.1.0"
