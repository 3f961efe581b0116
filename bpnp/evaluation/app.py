"""``evaluate.py``'s work, from a composed config to the files of the run directory.

Run directory contents (``hydra.run.dir``, default ``logs/eval/runs/<time>``)::

    metrics.json                 model summary, ``baselines``, ``sweep``, ``meta`` (report.py)
    instances.csv                one row per (instance, method) of the main evaluation
    sweep_instances.csv          the same for every outlier fraction of the sweep
    plots/error_cdf.png          cumulative rotation / centre error per method
    plots/sweep_success.png      success rate against added-outlier fraction
    plots/overlay_<k>_<name>.png correspondence overlays of the first instances

Errors a user can cause (bad paths, bad files, an incompatible checkpoint, a bad data config)
raise one of :func:`bpnp.runtime.cli.user_errors`, each with a one-line message naming the problem;
``evaluate.py`` prints ``error: <message>`` and exits with code 2 for them.
"""

from __future__ import annotations

import csv
import re
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from bpnp.data.bpnpnet_pickles import PickleFormatError
from bpnp.data.cameras import UnsupportedCameraError
from bpnp.data.colmap import ColmapFormatError
from bpnp.data.scenes import SceneFileError
from bpnp.evaluation import plots
from bpnp.runtime.checkpoint import load_network
from bpnp.runtime.cli import ConfigError
from bpnp.evaluation.report import summarize_methods, write_metrics_json, write_records_csv
from bpnp.evaluation.runner import EvalSettings, evaluate_instances
from bpnp.evaluation.sweep import parse_fractions, run_sweep

__all__ = ["build_dataset", "resolve_device", "run_evaluation"]


def _plain(cfg: Any) -> Any:
    if isinstance(cfg, DictConfig) or OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def resolve_device(name: str) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:1"``...; an unavailable CUDA device is a config error."""
    try:
        device = torch.device(str(name))
    except RuntimeError as exc:
        raise ConfigError(f"device={name}: not a torch device ({exc})") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device={name}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ConfigError(f"device={name}: use cpu or cuda[:i]")
    return device


def build_dataset(data_cfg: Mapping[str, Any] | DictConfig) -> tuple[Any, list[str]]:
    """The test split of a ``configs/data/*.yaml`` datamodule config, and a name per item.

    Evaluation reads only the test split, so the other splits are dropped before the datamodule
    is built (nothing of them is validated or read). ``data=colmap data.path=<model dir>``
    evaluates every registered image of that one model (``test_scenes = [path]``).

    Raises:
        ConfigError: the config cannot be built or configures no test data.
        SceneFileError, ColmapFormatError, ...: the data files themselves are bad.
    """
    from hydra.utils import instantiate

    cfg = dict(_plain(data_cfg) or {})
    source = cfg.get("source")
    path = cfg.get("path")
    if source == "scenes":
        if not path and not cfg.get("test_path"):
            raise ConfigError("data=scenes: set data.path=<directory of scene .npz files>")
        cfg.update(train_path=None, val_path=None)
    elif source == "colmap":
        if path:
            cfg.update(root=None, test_scenes=[str(path)])
        elif not cfg.get("test_scenes"):
            raise ConfigError("data=colmap: set data.path=<COLMAP sparse model directory>")
        cfg.update(train_scenes=None, val_scenes=None)
        cfg.pop("path", None)
    elif source == "synthetic":
        cfg.update(train_length=0, val_length=0)
    if "_target_" not in cfg:
        raise ConfigError(f"data config has no _target_ (got keys {sorted(cfg)})")
    try:
        dm = instantiate(cfg, _convert_="all")
        dataset = dm.dataset("test")
    except (SceneFileError, ColmapFormatError, UnsupportedCameraError, PickleFormatError):
        raise
    except (ValueError, TypeError, FileNotFoundError) as exc:
        raise ConfigError(f"data ({source}): {exc}") from exc
    except Exception as exc:  # hydra wraps constructor errors in InstantiationException
        cause = exc.__cause__ or exc
        if isinstance(cause, (SceneFileError, ColmapFormatError, UnsupportedCameraError, PickleFormatError)):
            raise cause from None
        raise ConfigError(f"data ({source}): {cause}") from exc
    if dataset is None or len(dataset) == 0:
        raise ConfigError(f"data ({source}): no test instances configured")
    return dataset, list(dm.names("test"))


def _settings(cfg: Mapping[str, Any], device: torch.device) -> EvalSettings:
    dtype = getattr(torch, str(cfg.get("baseline_dtype", "float64")), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"baseline_dtype={cfg.get('baseline_dtype')}: use float32 or float64")
    plots_cfg = cfg.get("plots") or {}
    try:
        return EvalSettings(
            device=str(device), baselines=tuple(cfg.get("baselines") or ()), baseline_dtype=dtype,
            hungarian_weights=str(cfg.get("hungarian_weights", "P")), seed=int(cfg.get("seed", 0)),
            warmup=int(cfg.get("warmup", 1)),
            num_overlays=int(plots_cfg.get("num_overlays", 4)) if plots_cfg.get("enabled", True) else 0,
            overlay_pairs=int(plots_cfg.get("overlay_pairs", 50)), progress_every=int(cfg.get("progress_every", 10)),
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def _summary_kwargs(metric_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Threshold settings of :func:`bpnp.evaluation.report.summarize`, validated."""
    out: dict[str, Any] = {}
    if "success_thresholds" in metric_cfg:
        pairs = metric_cfg["success_thresholds"] or []
        try:
            out["success_thresholds"] = [(float(r), float(c)) for r, c in pairs]
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"metrics.success_thresholds must be [rot_deg, center_rel] pairs, "
                                        f"got {pairs!r}") from exc
    if "auc_thresholds_deg" in metric_cfg:
        ths = metric_cfg["auc_thresholds_deg"] or []
        try:
            out["auc_thresholds_deg"] = [float(x) for x in ths]
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"metrics.auc_thresholds_deg must be numbers, got {ths!r}") from exc
        if any(not 0 < x < float("inf") for x in out["auc_thresholds_deg"]):
            raise ConfigError(f"metrics.auc_thresholds_deg must be > 0, got {ths!r}")
    return out


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:60]


def _validate_scene_files(dataset: Any, indices: list[int]) -> None:
    """Load every scene once up front, so a bad file fails before any compute."""
    for i in indices:
        dataset[i]


def run_evaluation(cfg: DictConfig | Mapping[str, Any], out_dir: str | Path | None = None,
                   log: Any = print) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt_path`` on ``cfg.data``; write everything to ``out_dir``.

    Args:
        cfg: the composed ``configs/evaluate.yaml``.
        out_dir: run directory (default: Hydra's ``runtime.output_dir``).
        log: progress printer.

    Returns:
        the metrics dict written to ``metrics.json``.

    Raises:
        one of :func:`bpnp.runtime.cli.user_errors` for bad inputs (see the module docstring).
    """
    if out_dir is None:
        from hydra.core.hydra_config import HydraConfig

        out_dir = HydraConfig.get().runtime.output_dir
    out_dir = Path(out_dir)
    c = _plain(cfg) if not isinstance(cfg, DictConfig) else cfg
    ckpt_path = c.get("ckpt_path")
    if not ckpt_path:
        raise ConfigError("ckpt_path is required: python evaluate.py ckpt_path=<file.ckpt> data=...")
    device = resolve_device(c.get("device", "cpu"))
    settings = _settings(c, device)
    summary_kwargs = _summary_kwargs(_plain(c.get("metrics")) or {})
    sweep_cfg = _plain(c.get("sweep")) or {}
    try:  # validate now, not after the main evaluation has run
        parse_fractions(sweep_cfg.get("fractions") or [])
        sweep_baselines = tuple(sweep_cfg.get("baselines", settings.baselines) or ())
        s_settings = EvalSettings(**{**settings.__dict__, "baselines": sweep_baselines})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"sweep: {exc}" if "sweep" not in str(exc) else str(exc)) from exc

    log(f"[evaluate] run dir: {out_dir}")
    from bpnp.runtime.config import compact_yaml

    log("[evaluate] config (resolved):\n" + compact_yaml(c, ["ckpt_path", "device", "seed", "max_instances", "net_overrides",
                                                           "baselines", "data", "sweep"]))
    net_overrides = _plain(c.get("net_overrides")) or {}
    net = load_network(ckpt_path, device, overrides=net_overrides)
    dataset, names = build_dataset(c["data"])
    limit = c.get("max_instances")
    indices = list(range(len(dataset) if limit is None else min(int(limit), len(dataset))))
    if (_plain(c["data"]) or {}).get("source") == "scenes":
        _validate_scene_files(dataset, indices)
    log(f"[evaluate] {len(indices)} instances, device {device}, baselines {list(settings.baselines)}")

    start = time.perf_counter()
    records, overlays = evaluate_instances(net, dataset, names, settings, indices=indices, log=log)
    metrics: dict[str, Any] = summarize_methods(records, **summary_kwargs)
    files = {"instances_csv": write_records_csv(out_dir / "instances.csv", records)}

    sweep_records: list[dict[str, Any]] = []
    if sweep_cfg.get("enabled", True) and sweep_cfg.get("fractions"):
        s_limit = sweep_cfg.get("max_instances")
        s_indices = indices if s_limit is None else indices[: int(s_limit)]
        same = s_indices == indices and s_settings.baselines == settings.baselines
        metrics["sweep"], sweep_records = run_sweep(
            net, dataset, names, s_settings, sweep_cfg["fractions"], seed=int(sweep_cfg.get("seed", 0)),
            indices=s_indices, reuse=records if same else None, summary_kwargs=summary_kwargs, log=log)
        files["sweep_csv"] = write_records_csv(out_dir / "sweep_instances.csv", sweep_records)

    plots_cfg = _plain(c.get("plots")) or {}
    if plots_cfg.get("enabled", True):
        pdir = out_dir / "plots"
        files["error_cdf"] = plots.plot_error_cdfs(records, pdir / "error_cdf.png", title=f"{len(indices)} instances")
        if "sweep" in metrics:
            files["sweep_plot"] = plots.plot_sweep(metrics["sweep"], pdir / "sweep_success.png")
        for k, ov in enumerate(overlays):
            files[f"overlay_{k}"] = plots.plot_overlay(ov, pdir / f"overlay_{k}_{_safe_name(ov.name)}.png")

    data_plain = _plain(c["data"]) or {}
    metrics["meta"] = {
        "ckpt_path": str(ckpt_path), "device": str(device), "net_overrides": dict(net_overrides),
        "data": {k: data_plain.get(k) for k in ("source", "path", "test_scenes", "seed") if k in data_plain},
        "num_instances": len(indices), "seed": settings.seed, "baselines": list(settings.baselines),
        "wall_time_s": time.perf_counter() - start,
        "files": {k: str(Path(v).relative_to(out_dir)) for k, v in files.items()},
    }
    path = write_metrics_json(out_dir / "metrics.json", metrics)
    _log_to_loggers(c, metrics, files, out_dir)
    log(f"[evaluate] model: success {metrics.get('success_rate', float('nan')):.3f}, median rot "
        f"{metrics.get('median_rot_err_deg', float('nan')):.3g} deg; wrote {path}")
    log(f"[evaluate] run dir: {out_dir} (metrics.json, instances.csv, plots/)")
    return metrics


def _flat_scalars(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if k in ("meta", "sweep"):
            continue
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flat_scalars(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
    return out


def _log_to_loggers(cfg: Any, metrics: Mapping[str, Any], files: Mapping[str, Path], out_dir: Path) -> None:
    """Log the scalar summary to every configured Lightning logger (``logger=csv|wandb|many``);
    W&B also gets the plots and the per-instance tables. Offline by default (configs/logger)."""
    if not cfg.get("logger"):
        return
    from bpnp.runtime.config import instantiate_group

    # The logger configs write to ${paths.output_dir}; point them at the run dir *before*
    # resolving, so that they also resolve outside a Hydra run (tests compose the configs).
    cfg = OmegaConf.create(_plain(cfg) if not isinstance(cfg, DictConfig) else OmegaConf.to_container(cfg))
    for node in cfg.logger.values():
        if isinstance(node, DictConfig) and "_target_" in node:
            with open_dict(node):
                node.save_dir = str(out_dir)
                if "Wandb" in str(node._target_):
                    node.job_type = "eval"
    nodes = OmegaConf.to_container(cfg.logger, resolve=True)
    loggers = instantiate_group(OmegaConf.create(nodes))
    scalars = _flat_scalars(metrics, "eval/")
    for res in (metrics.get("sweep") or {}).get("results", []):
        scalars.update(_flat_scalars(res, f"eval/sweep/{res['frac_2d']:g}_{res['frac_3d']:g}/"))
    for lg in loggers:
        lg.log_metrics(scalars)
        if type(lg).__name__ == "WandbLogger":
            import wandb

            run = lg.experiment
            run.summary.update(scalars)
            images = {f"eval/{k}": wandb.Image(str(p)) for k, p in files.items() if str(p).endswith(".png")}
            if images:
                run.log(images)
            run.save(str(out_dir / "metrics.json"), base_path=str(out_dir), policy="now")
            for key in ("instances_csv", "sweep_csv"):
                if key in files:
                    with open(files[key], newline="") as f:
                        rows = list(csv.reader(f))
                    run.log({f"eval/{key[:-4]}": wandb.Table(columns=rows[0], data=rows[1:])})
        if hasattr(lg, "finalize"):
            lg.finalize("success")
    if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        import wandb

        wandb.finish()
