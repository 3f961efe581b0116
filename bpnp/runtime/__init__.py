"""What the entry points and both of their halves (training and evaluation) need, below them.

=================================  ==============================================================
``bpnp.runtime.checkpoint``        network factory (``build_net``), checkpoint reading, weights-only
                                   files, compatibility checks, ``--set`` overrides
``bpnp.runtime.cli``               the command-line error policy: one ``error:`` line, exit 2 / 1
``bpnp.runtime.config``            instantiating config groups (loggers, callbacks)
``bpnp.runtime.solver``            ``BlindPnPSolver`` (``bpnp.BlindPnPSolver``): arrays in, pose out,
                                   in one call; ``python -m bpnp.solve`` is its command line
=================================  ==============================================================

Layering: ``runtime`` imports ``models``, ``data``, ``geometry`` and ``nodes``, never ``training``
or ``evaluation``; both of those import it.
"""
