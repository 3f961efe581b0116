"""Config helpers shared by the entry points (Hydra/OmegaConf only): instantiating config
groups, validating every value of a composed config before any work starts, and the compact
YAML the entry points print at the start of a run.

:func:`check_train_config` / :func:`check_eval_config` check the types and ranges of the values
of ``configs/train.yaml`` / ``configs/evaluate.yaml`` (top-level keys, ``data``, ``model``
without its network, ``trainer``, ``callbacks``; the network's settings through
:func:`bpnp.models.settings.check_net_config`) and raise :class:`bpnp.runtime.cli.ConfigError`
whose one-line message starts with the full key, e.g. ``model.optimizer.lr: expected a number >
0, got 'abc'``. Both entry points run them on the composed command line before Hydra creates the
run directory (:func:`bpnp.runtime.cli.config_error`), and again at the start of their work (for
in-process callers). A key a config does not have is not checked (a constructor further down
still rejects what it cannot use, with the config group in the message).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf

from bpnp.runtime.cli import ConfigError, check_creatable_dir
from bpnp.values import ValueCheckError, choice, either, flag, integer, is_int, number, text

__all__ = ["instantiate_group", "check_train_config", "check_eval_config", "check_data_config", "check_output_dirs",
           "usable_cpu_cores", "compact_yaml", "SUPPORTED_PRECISIONS"]


def instantiate_group(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a config group mapping (callbacks, loggers)."""
    from hydra.utils import instantiate

    out: list[Any] = []
    if not cfg:
        return out
    for _, node in cfg.items():
        if isinstance(node, DictConfig) and "_target_" in node:
            out.append(instantiate(node))
    return out


# -- value checks -------------------------------------------------------------------------------------
_ABSENT = object()


def _get(cfg: DictConfig, key: str) -> Any:
    """The value at ``key`` as plain Python (containers converted), or ``_ABSENT``."""
    try:
        value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=True)
    except Exception as exc:  # an interpolation that does not resolve, a missing (???) value
        raise ConfigError(f"{key}: {exc}".splitlines()[0]) from None
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    return value


def _target(key: str, v: Any) -> Any:
    if not isinstance(v, dict) or not isinstance(v.get("_target_"), str):
        raise ValueCheckError(f"{key}: expected a mapping with a _target_ (class path), got {v!r}")
    return v


def _apply(cfg: DictConfig, checks: Iterable[tuple[str, Callable]]) -> None:
    for key, check in checks:
        value = _get(cfg, key)
        if value is not _ABSENT:
            try:
                check(key, value)
            except ValueCheckError as exc:
                raise ConfigError(str(exc)) from None


# -- the groups -------------------------------------------------------------------------------------
_FRACTION = either(integer(lo=0), number(lo=0.0, hi=1.0), want="an integer >= 0 (batches) or a number in [0, 1] (fraction)")

TOP_LEVEL_TRAIN = (
    ("task_name", text()), ("seed", integer(lo=0, hi=2**32 - 1)), ("flush_denormal", flag()), ("train", flag()),
    ("test", flag()), ("ckpt_path", text(none=True)), ("init_ckpt", text(none=True)), ("resume_foreign", flag()),
    ("optimized_metric", text(none=True)),
)

DATA = (
    ("data.source", choice("synthetic", "scenes", "colmap", "pickles")),
    ("data.batch_size", integer(lo=1, note=" (per device)")), ("data.eval_batch_size", integer(lo=1, none=True)),
    ("data.num_workers", integer(lo=0)), ("data.pad_multiple", integer(lo=1)), ("data.seed", integer()),
    ("data.train_length", integer(lo=0)), ("data.val_length", integer(lo=0)), ("data.test_length", integer(lo=0)),
    ("data.resample_each_epoch", flag()), ("data.pin_memory", flag()), ("data.persistent_workers", flag()),
    ("data.max_points_2d", integer(lo=1, none=True)), ("data.max_points_3d", integer(lo=1, none=True)),
    ("data.outlier_frac_3d", number(lo=0.0, hi=1.0, hi_open=True)), ("data.val_fraction", number(lo=0.0, hi=1.0, hi_open=True)),
    ("data.add_outlier_frac_2d", number(lo=0.0, hi=1.0, hi_open=True)),
    ("data.add_outlier_frac_3d", number(lo=0.0, hi=1.0, hi_open=True)),
    ("data.path", text(none=True)), ("data.root", text(none=True)),
)

MODEL = (
    ("model.optimizer", _target), ("model.optimizer.lr", number(lo=0.0, lo_open=True)),
    ("model.optimizer.weight_decay", number(lo=0.0)), ("model.optimizer.momentum", number(lo=0.0)),
    ("model.optimizer.eps", number(lo=0.0, lo_open=True)),
    ("model.scheduler", either(_target, choice(None), want="null or a mapping with a _target_")),
    ("model.scheduler.interval", choice("epoch", "step")), ("model.scheduler.frequency", integer(lo=1)),
    ("model.scheduler.T_max", integer(lo=1)), ("model.scheduler.eta_min", number(lo=0.0)),
    ("model.scheduler.step_size", integer(lo=1)), ("model.scheduler.gamma", number(lo=0.0, lo_open=True)),
    ("model.loss.corr_weight", number(lo=0.0)), ("model.loss.pose_weight", number(lo=0.0)),
    ("model.loss.pose_start_epoch", integer(lo=0, none=True)), ("model.loss.rot_cap", number(lo=0.0, lo_open=True)),
    ("model.loss.t_cap", number(lo=0.0, lo_open=True)), ("model.loss.corr_kind", choice("nll", "linear")),
    ("model.eval_seed", integer()), ("model.train_seed", integer()), ("model.train_pose_every_n_steps", integer(lo=1)),
    ("model.num_viz", integer(lo=0)),
)

_PRECISIONS = (16, 32, 64, "16", "32", "64", "bf16", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "32-true",
               "64-true", "transformer-engine", "transformer-engine-float16")
#: The trainer precisions the network trains in: its nodes (Sinkhorn, RANSAC, refinement) need
#: float32 or wider, and under 16-bit autocast Sinkhorn's marginals lose their equal mass
#: (``ValueError: marginals must have equal mass per item`` at step 0).
SUPPORTED_PRECISIONS = (32, "32", "32-true")


def _precision(key: str, v: Any) -> Any:
    choice(*_PRECISIONS)(key, v)
    if v not in SUPPORTED_PRECISIONS:
        raise ValueCheckError(
            f"{key}={v}: not supported: the Sinkhorn, RANSAC and refinement nodes need float32 (16-bit and "
            f"mixed precision break Sinkhorn's equal-mass marginals at the first step); use {key}=32")
    return v

TRAINER = (
    ("trainer.max_epochs", integer(lo=-1, note=" (-1 = no limit)")), ("trainer.min_epochs", integer(lo=0, none=True)),
    ("trainer.max_steps", integer(lo=-1, note=" (-1 = no limit)")), ("trainer.num_nodes", integer(lo=1)),
    ("trainer.accelerator", choice("cpu", "gpu", "cuda", "mps", "tpu", "auto")),
    ("trainer.precision", _precision),
    ("trainer.check_val_every_n_epoch", integer(lo=1, none=True)), ("trainer.log_every_n_steps", integer(lo=1)),
    ("trainer.num_sanity_val_steps", integer(lo=-1, note=" (-1 = all)")),
    ("trainer.gradient_clip_val", number(lo=0.0, none=True)), ("trainer.gradient_clip_algorithm", choice("norm", "value")),
    ("trainer.deterministic", either(flag(), choice("warn"), want="true, false or warn")),
    ("trainer.reload_dataloaders_every_n_epochs", integer(lo=0)), ("trainer.accumulate_grad_batches", integer(lo=1)),
    ("trainer.limit_train_batches", _FRACTION), ("trainer.limit_val_batches", _FRACTION),
    ("trainer.limit_test_batches", _FRACTION), ("trainer.overfit_batches", _FRACTION),
    ("trainer.val_check_interval", either(integer(lo=1), number(lo=0.0, hi=1.0, lo_open=True), choice(None),
                                          want="an integer >= 1 (batches), a number in (0, 1] (fraction) or null")),
    ("trainer.fast_dev_run", either(flag(), integer(lo=0), want="true, false or an integer >= 0 (batches)")),
    ("trainer.enable_progress_bar", flag()), ("trainer.sync_batchnorm", flag()),
    ("trainer.use_distributed_sampler", flag()), ("trainer.benchmark", flag(none=True)),
)

CALLBACKS = (
    ("callbacks.model_checkpoint.save_top_k", integer(lo=-1)), ("callbacks.model_checkpoint.mode", choice("min", "max")),
    ("callbacks.periodic_checkpoint.every_n_train_steps", integer(lo=1, none=True)),
    ("callbacks.progress_bar.refresh_rate", integer(lo=0)), ("callbacks.pose_plots.num_samples", integer(lo=0)),
    ("callbacks.pose_plots.every_n_epochs", integer(lo=1)), ("callbacks.pose_plots.max_lines", integer(lo=0)),
    ("callbacks.lr_monitor.logging_interval", choice("step", "epoch", none=True)),
)


def usable_cpu_cores() -> int:
    """CPU cores this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _check_devices(cfg: DictConfig) -> None:
    """``trainer.devices`` against what this machine has: CPU processes against its cores, GPUs
    against CUDA (with the CPU trainers named when there is no GPU)."""
    accel, devices = _get(cfg, "trainer.accelerator"), _get(cfg, "trainer.devices")
    if devices is _ABSENT:
        return
    if not (devices == "auto" or is_int(devices) or (isinstance(devices, list) and all(is_int(d) for d in devices))
            or (isinstance(devices, str) and devices.replace(",", "").replace("-", "").strip().isdigit())):
        raise ConfigError(f"trainer.devices: expected an integer >= 1, a list of device indices or auto, got {devices!r}")
    if is_int(devices) and devices < 1 and not (devices == -1 and accel not in ("cpu", _ABSENT)):
        raise ConfigError(f"trainer.devices: expected an integer >= 1, got {devices}")
    if accel == "cpu":
        if not is_int(devices):
            raise ConfigError(f"trainer.devices: with trainer.accelerator=cpu give the number of processes, got {devices!r}")
        cores = usable_cpu_cores()
        if devices > cores:
            raise ConfigError(f"trainer.devices={devices}: this machine has {cores} CPU core(s) and each CPU device is one "
                              f"training process; use trainer.devices<={cores}")
    elif accel in ("gpu", "cuda"):
        import torch

        hint = "use trainer=cpu, or trainer=ddp_cpu for DDP over CPU processes"
        if not torch.cuda.is_available():
            raise ConfigError(f"trainer.accelerator={accel}: no CUDA GPU is available on this machine; {hint}")
        count = torch.cuda.device_count()
        wanted = devices if is_int(devices) and devices > 0 else (len(devices) if isinstance(devices, list) else 0)
        if wanted > count:
            raise ConfigError(f"trainer.devices={devices}: this machine has {count} CUDA GPU(s)")


def _check_net(cfg: DictConfig, key: str, partial: bool = False) -> None:
    """The network's settings, by their owner (:func:`bpnp.models.settings.check_net_config`)."""
    from bpnp.models.settings import SettingError, check_net_config, merge_overrides

    net = _get(cfg, key)
    if net is _ABSENT or net is None:
        return
    if not isinstance(net, dict):
        raise ConfigError(f"{key}: expected a mapping of network settings, got {net!r}")
    try:
        if partial:  # overrides over a checkpoint's network: dotted or nested keys
            merge_overrides({}, net, prefix=key)
        else:
            check_net_config(net, prefix=key)
    except SettingError as exc:
        raise ConfigError(str(exc)) from None


def _check_optimizer(cfg: DictConfig) -> None:
    """Build ``model.optimizer`` (and ``model.scheduler`` on it) for one dummy parameter: an
    unknown argument or a value the class rejects is found now, not at the first training step."""
    opt_cfg, sched_cfg = _get(cfg, "model.optimizer"), _get(cfg, "model.scheduler")
    if not isinstance(opt_cfg, dict) or "_target_" not in opt_cfg:
        return
    import torch
    from hydra.utils import instantiate

    def build(key: str, node: dict, **kwargs: Any) -> Any:
        try:
            return instantiate(node, **kwargs)
        except Exception as exc:
            cause = exc.__cause__ or exc
            raise ConfigError(f"{key}: {str(cause).splitlines()[0] if str(cause) else type(cause).__name__}") from None

    opt = build("model.optimizer", opt_cfg, params=[torch.nn.Parameter(torch.zeros(1))])
    if isinstance(sched_cfg, dict) and "_target_" in sched_cfg:
        node = {k: v for k, v in sched_cfg.items() if k not in ("interval", "frequency", "monitor")}
        build("model.scheduler", node, optimizer=opt)


def check_output_dirs(cfg: DictConfig) -> None:
    """``paths.log_dir`` and, composed with Hydra's config, ``hydra.run.dir`` can be created and
    written: Hydra creates the run directory before the job starts, and a failure there is its
    traceback (``paths.log_dir=/proc/x``). Nothing is left behind (:func:`check_creatable_dir`)."""
    from pathlib import Path

    checked: list[Path] = []
    for key in ("paths.log_dir", "hydra.run.dir"):
        try:
            value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        except Exception:  # an interpolation only Hydra's runtime can resolve
            continue
        if not isinstance(value, str) or not value:
            continue
        path = Path(value).expanduser().absolute()
        if any(path == c or c in path.parents for c in checked):
            continue  # the run dir under a log dir just checked: no probe inside it (runs of others)
        check_creatable_dir(path, key)
        checked.append(path)


def check_data_config(cfg: DictConfig) -> None:
    """The datamodule's common keys (``data.*``), each named."""
    _apply(cfg, DATA)


def check_train_config(cfg: DictConfig) -> None:
    """Every value of a composed ``configs/train.yaml`` that can be checked without reading a file
    (types, ranges, choices, devices against this machine); raises :class:`ConfigError` naming
    the first bad key."""
    _apply(cfg, TOP_LEVEL_TRAIN)
    check_output_dirs(cfg)
    _apply(cfg, TRAINER)
    _check_devices(cfg)
    _apply(cfg, DATA)
    _apply(cfg, MODEL)
    _check_optimizer(cfg)
    _check_net(cfg, "model.net")
    _apply(cfg, CALLBACKS)


TOP_LEVEL_EVAL = (
    ("task_name", text()), ("seed", integer(lo=0)), ("ckpt_path", text(none=True)), ("device", text()),
    ("max_instances", integer(lo=1, none=True)), ("baseline_dtype", choice("float32", "float64")),
    ("hungarian_weights", choice("P", "uniform")), ("warmup", integer(lo=0)), ("progress_every", integer(lo=0)),
    ("sweep.enabled", flag()), ("sweep.seed", integer(lo=0)), ("sweep.max_instances", integer(lo=1, none=True)),
    ("plots.enabled", flag()), ("plots.num_overlays", integer(lo=0)), ("plots.overlay_pairs", integer(lo=1)),
)


def check_eval_config(cfg: DictConfig) -> None:
    """Every value of a composed ``configs/evaluate.yaml`` that can be checked without reading a
    file; raises :class:`ConfigError` naming the first bad key."""
    _apply(cfg, TOP_LEVEL_EVAL)
    check_output_dirs(cfg)
    for key in ("baselines", "sweep.baselines"):
        value = _get(cfg, key)
        if value is not _ABSENT and value is not None:
            known = ("oracle", "ransac", "hungarian", "nosearch")  # bpnp.evaluation.runner.METHODS[1:]
            if not isinstance(value, list) or any(v not in known for v in value):
                raise ConfigError(f"{key}: expected a list of {', '.join(known)} (any subset), got {value!r}")
    _apply(cfg, DATA)
    _check_net(cfg, "net_overrides", partial=True)


# -- printing -------------------------------------------------------------------------------------------
def compact_yaml(cfg: Any, keys: Iterable[str] | None = None) -> str:
    """The resolved ``cfg`` (or only its ``keys``, in that order) as YAML with lists and mappings
    of scalars on one line (what the entry points print at the start of a run)."""
    import yaml

    def plain(node: Any) -> Any:
        return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node

    if keys is None:
        out = plain(cfg)
        out.pop("hydra", None)
    else:  # only these keys are resolved (others, e.g. paths under Hydra's resolver, need not be)
        out = {k: plain(cfg[k]) for k in keys if k in cfg}
    # PyYAML's default_flow_style=None: collections of scalars on one line, nested ones as blocks
    return yaml.safe_dump(out, sort_keys=False, default_flow_style=None, width=110).rstrip()
