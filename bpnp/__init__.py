"""bpnp: blind Perspective-n-Point solved end to end with declarative nodes.

Layers import downwards only: ``nodes`` <- ``geometry`` <- ``models`` <- ``training`` /
``evaluation`` <- entry points (``train.py``, ``evaluate.py``).
"""

__version__ = "0.1.0"
