"""Evaluation: the per-instance runner, baselines, reports, plots, outlier sweep, checkpoints.

================================  =========================================================
module                            job
================================  =========================================================
``bpnp.evaluation.runner``        one instance at a time through the model and baselines
``bpnp.evaluation.baselines``     oracle (true pairs), Hungarian on the cost, RANSAC pose
``bpnp.evaluation.report``        summary metrics, ``metrics.json``, per-instance CSV
``bpnp.evaluation.plots``         error CDFs, sweep curve, correspondence overlays (Agg)
``bpnp.evaluation.sweep``         the same scenes with added 2D/3D outliers
``bpnp.runtime.checkpoint``    network from a Lightning .ckpt or a weights-only file
``bpnp.evaluation.app``           ``evaluate.py``'s work: config -> run directory
================================  =========================================================

Submodules are imported on use (``from bpnp.evaluation.report import summarize``), so that
importing one does not pull in matplotlib, scipy or Lightning.
"""
