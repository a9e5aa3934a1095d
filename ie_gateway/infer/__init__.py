"""Model packages and inference: manifest, registry (versions, activation), ensemble, runner."""

import os

# OpenMP's idle threads spin before they sleep (libgomp reads this when torch loads it, in the
# inference child, which imports this package first): on a VM shared with the receiver and other
# services the spinning is CPU time taken from them, a fifth of the demo model's user time on a
# loaded machine. An admin's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
