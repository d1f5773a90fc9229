"""Trajectory matching: expert trajectories (``experts``), the differentiable unroll (``unroll``) and the methods
``mkdt``, ``mtt`` and ``mtt-ssl`` (``matching``)."""
