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
``evaluate.py`` prints ``error: <message>`` and exits with code 2 for them. They are found before
any instance is evaluated: every scene file is read and its ground truth checked
(:func:`bpnp.data.scenes.check_ground_truth`), and the largest instance's memory is compared with
the memory available (:mod:`bpnp.evaluation.memory`).

``instances.csv`` is written as instances finish (a row per method, flushed per instance). An
interruption (Ctrl-C, or SIGTERM under :func:`bpnp.runtime.cli.interrupt_signals`) writes a
partial ``metrics.json`` over the finished instances with ``"complete": false`` and
``"instances_done"`` and re-raises :class:`bpnp.runtime.cli.Interrupted` saying what was kept;
a complete run's ``metrics.json`` has ``"complete": true``. ``ckpt_path=last`` evaluates the
newest ``<paths.log_dir>/*/runs/*/checkpoints/last.ckpt`` of any task and says which it picked.
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
from bpnp.data.scenes import SceneFileError, check_ground_truth
from bpnp.evaluation import plots
from bpnp.evaluation.memory import check_instance_memory
from bpnp.runtime.checkpoint import load_network, resolve_eval_checkpoint
from bpnp.runtime.cli import ConfigError, Interrupted, resolve_device  # resolve_device: re-exported
from bpnp.evaluation.report import RecordsCsvWriter, summarize_methods, write_metrics_json
from bpnp.evaluation.runner import EvalSettings, evaluate_instances
from bpnp.evaluation.sweep import parse_fractions, run_sweep

__all__ = ["build_dataset", "resolve_device", "run_evaluation"]


def _plain(cfg: Any) -> Any:
    if isinstance(cfg, DictConfig) or OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


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


def _log_dir(c: Any) -> str:
    """``paths.log_dir`` alone (its siblings may need Hydra's runtime to resolve), default logs."""
    if isinstance(c, DictConfig):
        value = OmegaConf.select(c, "paths.log_dir", default=None)
    else:
        value = (c.get("paths") or {}).get("log_dir")
    return str(value) if value else "logs"


def _scene_files(dataset: Any) -> list[Any] | None:
    """The files of a scene-directory dataset (through an outlier wrapper), else None."""
    while dataset is not None and not hasattr(dataset, "files"):
        dataset = getattr(dataset, "base", None)
    return None if dataset is None else list(dataset.files)


def _validate_scene_files(dataset: Any, indices: list[int]) -> list[tuple[str, int, int]]:
    """Load every scene once up front and check its ground truth, so a bad file fails before any
    compute; returns ``(file, m, n)`` of each instance as it will be evaluated."""
    files = _scene_files(dataset)
    sizes = []
    for i in indices:
        scene = dataset[i]
        name = str(files[i]) if files is not None else str(i)
        check_ground_truth(scene, name)
        sizes.append((name, len(scene["p2d"]), len(scene["p3d"])))
    return sizes


def _size_bounds(dataset: Any, names: list[str], indices: list[int], source: str) -> list[tuple[str, int, int]]:
    """``(name, m, n)`` upper bounds of every instance from the dataset's ``size_bound`` (COLMAP,
    synthetic; through an outlier wrapper, grown by its fractions), without building any; empty
    when the dataset cannot tell."""
    base, grow = dataset, (1.0, 1.0)
    if not hasattr(base, "size_bound") and hasattr(base, "base") and hasattr(base, "frac_2d"):
        grow = (1.0 / (1.0 - float(base.frac_2d)), 1.0 / (1.0 - float(base.frac_3d)))
        base = base.base
    bound = getattr(base, "size_bound", None)
    if bound is None:
        return []
    out = []
    for i in indices:
        m, n = bound(i)
        label = f"{source} instance {names[i] if i < len(names) else i}"
        out.append((label, int(round(m * grow[0])), int(round(n * grow[1]))))
    return out


def _sweep_growth(sweep_cfg: Mapping[str, Any]) -> tuple[float, float]:
    """How much the outlier sweep's largest fractions grow ``m`` and ``n`` (1 / (1 - f))."""
    if not sweep_cfg.get("enabled", True) or not sweep_cfg.get("fractions"):
        return 1.0, 1.0
    pairs = parse_fractions(sweep_cfg["fractions"])
    return 1.0 / (1.0 - max(f2 for f2, _ in pairs)), 1.0 / (1.0 - max(f3 for _, f3 in pairs))


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
    log_dir = _log_dir(c)
    ckpt_path, picked = resolve_eval_checkpoint(ckpt_path, log_dir)
    if picked:
        log(f"[evaluate] ckpt_path=last picked {ckpt_path} (the newest last.ckpt under {log_dir}/*/runs)")
    net = load_network(ckpt_path, device, overrides=net_overrides)
    dataset, names = build_dataset(c["data"])
    limit = c.get("max_instances")
    indices = list(range(len(dataset) if limit is None else min(int(limit), len(dataset))))
    source = str((_plain(c["data"]) or {}).get("source"))
    if source == "scenes":
        sizes = _validate_scene_files(dataset, indices)
    else:
        sizes = _size_bounds(dataset, names, indices, source)
    all_baselines = tuple(settings.baselines) + tuple(s_settings.baselines)
    check_instance_memory(sizes, str(device), all_baselines, _sweep_growth(sweep_cfg), source=source)
    log(f"[evaluate] {len(indices)} instances, device {device}, baselines {list(settings.baselines)}")

    start = time.perf_counter()
    done: list[dict[str, Any]] = []  # records of the finished instances (also in instances.csv)
    stage = {"name": "main", "count": 0}
    files: dict[str, Path] = {}
    main_csv = RecordsCsvWriter(out_dir / "instances.csv")
    sweep_csv: RecordsCsvWriter | None = None
    files["instances_csv"] = main_csv.path

    def finished(recs: list[dict[str, Any]]) -> None:
        main_csv.write(recs)
        done.extend(recs)
        stage["count"] += 1

    try:
        records, overlays = evaluate_instances(net, dataset, names, settings, indices=indices, log=log,
                                               on_instance=finished)
        main_csv.close()
        metrics: dict[str, Any] = summarize_methods(records, **summary_kwargs)

        sweep_records: list[dict[str, Any]] = []
        if sweep_cfg.get("enabled", True) and sweep_cfg.get("fractions"):
            stage["name"] = "sweep"
            s_limit = sweep_cfg.get("max_instances")
            s_indices = indices if s_limit is None else indices[: int(s_limit)]
            same = s_indices == indices and s_settings.baselines == settings.baselines
            sweep_csv = RecordsCsvWriter(out_dir / "sweep_instances.csv")
            files["sweep_csv"] = sweep_csv.path
            metrics["sweep"], sweep_records = run_sweep(
                net, dataset, names, s_settings, sweep_cfg["fractions"], seed=int(sweep_cfg.get("seed", 0)),
                indices=s_indices, reuse=records if same else None, summary_kwargs=summary_kwargs, log=log,
                on_records=sweep_csv.write)
            sweep_csv.close()
        stage["name"] = "plots"
        plots_cfg = _plain(c.get("plots")) or {}
        if plots_cfg.get("enabled", True):
            pdir = out_dir / "plots"
            files["error_cdf"] = plots.plot_error_cdfs(records, pdir / "error_cdf.png",
                                                       title=f"{len(indices)} instances")
            if "sweep" in metrics:
                files["sweep_plot"] = plots.plot_sweep(metrics["sweep"], pdir / "sweep_success.png")
            for k, ov in enumerate(overlays):
                files[f"overlay_{k}"] = plots.plot_overlay(ov, pdir / f"overlay_{k}_{_safe_name(ov.name)}.png")
    except KeyboardInterrupt as exc:
        main_csv.close()
        if sweep_csv is not None:
            sweep_csv.close()
        raise _interrupted(exc, c, out_dir, done, stage, len(indices), summary_kwargs, settings, device,
                           net_overrides, ckpt_path, start, files) from None
    metrics["complete"] = True
    metrics["instances_done"] = len(indices)

    metrics["meta"] = _meta(c, ckpt_path, device, net_overrides, len(indices), settings, start, files, out_dir)
    path = write_metrics_json(out_dir / "metrics.json", metrics)
    _log_to_loggers(c, metrics, files, out_dir)
    log(f"[evaluate] model: success {metrics.get('success_rate', float('nan')):.3f}, median rot "
        f"{metrics.get('median_rot_err_deg', float('nan')):.3g} deg; wrote {path}")
    log(f"[evaluate] run dir: {out_dir} (metrics.json, instances.csv, plots/)")
    return metrics


def _meta(c: Any, ckpt_path: Any, device: Any, net_overrides: Mapping[str, Any], num: int, settings: EvalSettings,
          start: float, files: Mapping[str, Path], out_dir: Path) -> dict[str, Any]:
    data_plain = _plain(c["data"]) or {}
    return {
        "ckpt_path": str(ckpt_path), "device": str(device), "net_overrides": dict(net_overrides),
        "data": {k: data_plain.get(k) for k in ("source", "path", "test_scenes", "seed") if k in data_plain},
        "num_instances": num, "seed": settings.seed, "baselines": list(settings.baselines),
        "wall_time_s": time.perf_counter() - start,
        "files": {k: str(Path(v).relative_to(out_dir)) for k, v in files.items()},
    }


def _interrupted(exc: BaseException, c: Any, out_dir: Path, done: list[dict[str, Any]], stage: Mapping[str, Any],
                 total: int, summary_kwargs: Mapping[str, Any], settings: EvalSettings, device: Any,
                 net_overrides: Mapping[str, Any], ckpt_path: Any, start: float,
                 files: Mapping[str, Path]) -> Interrupted:
    """Write the partial ``metrics.json`` of an interrupted run (the finished instances of the
    main evaluation; ``"complete": false``) and the :class:`Interrupted` that says what was kept."""
    signum = getattr(exc, "signum", 2)
    count = int(stage["count"])
    metrics: dict[str, Any] = summarize_methods(done, **summary_kwargs)
    metrics.update(complete=False, instances_done=count, interrupted_in=str(stage["name"]))
    metrics["meta"] = _meta(c, ckpt_path, device, net_overrides, total, settings, start, files, out_dir)
    try:
        write_metrics_json(out_dir / "metrics.json", metrics)
    except OSError as err:  # the disk that is full: the CSV rows are still there
        return Interrupted(signum, f"kept {count} of {total} instances in {out_dir / 'instances.csv'} "
                                   f"(metrics.json not written: {err.strerror or err})")
    after = {"main": "", "sweep": "; the outlier sweep was cut short", "plots": "; the plots were cut short"}
    return Interrupted(signum, f"kept {count} of {total} instances in {out_dir}{after.get(str(stage['name']), '')} "
                               "(metrics.json complete: false)")


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
