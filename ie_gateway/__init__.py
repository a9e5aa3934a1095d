"""ie_gateway: a DICOM node that brings AI auto-contouring into the radiotherapy workflow."""

import os

# numpy asks the kernel for transparent huge pages (madvise) on every array of 4 MiB or more.
# With the kernel's usual THP setting (defrag: madvise) the first touch of each 2 MiB page may
# stall while the kernel compacts memory to find one, and a node's memory is mostly page cache
# of the spool, so it often must: the label map, the masks and the CT volume of each job paid
# it. Measured (bench/e2e.py, label map -> RT-STRUCT stored): 1.52-1.56 s with it, 1.04-1.16 s
# without; inference unchanged (torch does not ask). numpy reads this when it is imported, and
# the package is imported before numpy by every node process; the children inherit it. An
# admin's own setting wins.
os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")

__version__ = "0.1.0"
