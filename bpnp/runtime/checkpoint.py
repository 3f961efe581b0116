"""Load the network of a checkpoint for evaluation, on one device.

Two formats are accepted:

- a **Lightning checkpoint** (``.ckpt``) of :class:`bpnp.training.module.BlindPnPModule`:
  ``hyper_parameters["net"]`` holds the network's keyword arguments (optionally with a
  ``_target_``) and ``state_dict`` the module's weights, the network's under the ``net.`` prefix;
- a **weights-only file** ``{"state_dict": ..., "config": ...}`` where ``config`` is the network's
  keyword arguments (or a mapping with a ``net`` entry holding them) and ``state_dict`` the
  network's weights (with or without the ``net.`` prefix). :func:`save_weights_only` writes one.

Only the network is rebuilt (not the LightningModule, its loss or optimizer), with
:func:`build_net`, the builder training uses too. Every problem raises :class:`CheckpointError`
with one line naming the file and the problem. :func:`state_dict_mismatch` and
:func:`net_config_mismatch` are the checks ``train.py`` runs before resuming or fine-tuning.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml
from torch import nn

from bpnp.models.settings import SettingError, merge_overrides, upgrade_flat_config

__all__ = ["CheckpointError", "build_net", "load_checkpoint_dict", "network_config", "load_network", "network_from_dict",
           "save_weights_only", "parse_set_overrides", "state_dict_mismatch", "net_config_mismatch", "check_weights",
           "WEIGHT_BOUND", "RUNNING_STAT_BOUND", "find_latest_checkpoint", "resolve_eval_checkpoint"]

#: Prefix of the network's parameters in the LightningModule's state dict (``self.net``).
NET_PREFIX = "net."


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not fit the network it describes."""


def build_net(net: Mapping[str, Any] | nn.Module | None) -> nn.Module:
    """A network from keyword arguments (optionally with ``_target_``, default
    :class:`bpnp.models.network.BlindPnPNet`) or an existing module (returned as is)."""
    if isinstance(net, nn.Module):
        return net
    from hydra.utils import get_class

    cfg = dict(net or {})
    target = cfg.pop("_target_", "bpnp.models.network.BlindPnPNet")
    cfg.pop("_partial_", None)
    return get_class(target)(**cfg)


def load_checkpoint_dict(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint file into a dict on the CPU.

    Tries ``torch.load(weights_only=True)`` first (no code execution); Lightning checkpoints
    written by this project hold only plain containers, so that normally suffices. Older or
    foreign checkpoints that pickle other objects are loaded with ``weights_only=False``, which,
    like Lightning's own loader, trusts the file: only evaluate checkpoints you trust.

    Raises:
        CheckpointError: no such file, or not a torch checkpoint holding a dict.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")

    def unreadable(exc: BaseException) -> CheckpointError:
        with open(path, "rb") as f:
            head = f.read(24)
        if not head.startswith((b"PK\x03\x04", b"\x80")):  # neither torch.save's zip nor a legacy pickle
            return CheckpointError(f"{path}: not a PyTorch checkpoint file (it starts with {head!r})")
        first = (str(exc).strip().splitlines() or [""])[0]
        return CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {first})")

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" not in str(exc).lower():
            raise unreadable(exc) from exc
        try:  # a valid pickle that holds more than tensors and containers
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc2:
            raise unreadable(exc2) from exc2
    except Exception as exc:  # a corrupt file fails in many ways (zip, EOF, unpickler internals)
        raise unreadable(exc) from exc
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{path}: expected a checkpoint dict, got {type(ckpt).__name__}")
    return dict(ckpt)


def network_config(ckpt: Mapping[str, Any], name: str = "<checkpoint>") -> dict[str, Any]:
    """The network's keyword arguments stored in a checkpoint dict (either format).

    Raises:
        CheckpointError: when neither ``hyper_parameters["net"]`` nor ``config`` is present.
    """
    hp = ckpt.get("hyper_parameters")
    if isinstance(hp, Mapping) and isinstance(hp.get("net"), Mapping):
        return dict(hp["net"])
    cfg = ckpt.get("config")
    if isinstance(cfg, Mapping):
        return dict(cfg["net"]) if isinstance(cfg.get("net"), Mapping) else dict(cfg)
    raise CheckpointError(
        f"{name}: incompatible checkpoint: no network config (expected hyper_parameters['net'] of a "
        "BlindPnPModule checkpoint or a 'config' entry of a weights-only file)"
    )


def legacy_network_defaults(cfg: Mapping[str, Any], state: Mapping[str, Any]) -> dict[str, Any]:
    """The network config of a checkpoint in today's form. Older checkpoints hold the flat
    setting names of before the ``sinkhorn`` / ``ransac`` / ``refine`` groups (moved into them,
    :func:`bpnp.models.settings.upgrade_flat_config`), and those written before ``matcher`` and
    ``bins`` existed leave implicit that their weights are the original encoders (``encoder2d.*``),
    without bins, built with that era's code defaults (depth 12, no kNN stem). Settings the
    config states win."""
    cfg = upgrade_flat_config(cfg)
    if "matcher" not in cfg and any(str(k).startswith("encoder2d.") for k in state):
        cfg = {"matcher": "bpnpnet", "depth": 12, "knn": 0, **cfg}
    sinkhorn = dict(cfg.get("sinkhorn") or {})
    if "bins" not in sinkhorn and not any(str(k).endswith("bin_cost") for k in state):
        cfg["sinkhorn"] = {**sinkhorn, "bins": "none"}
    return cfg


def _network_state(ckpt: Mapping[str, Any], name: str) -> dict[str, torch.Tensor]:
    state = ckpt.get("state_dict")
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(f"{name}: incompatible checkpoint: no 'state_dict' with weights")
    if any(k.startswith(NET_PREFIX) for k in state):
        # LightningModule layout: keep the network's entries, drop metrics and the like.
        return {k[len(NET_PREFIX):]: v for k, v in state.items() if k.startswith(NET_PREFIX)}
    return dict(state)


#: Largest |w| accepted in a checkpoint's weights (docs/reliability.md): trained weights of this
#: network stay near 1 (the shipped checkpoints: max |w| 1.26), so 1e4 is far above any trained
#: weight and far below what a flipped exponent bit gives (2.4e24 and the like).
WEIGHT_BOUND = 1e4
#: The same for batch-norm running statistics (``running_mean``/``running_var``), which scale with
#: the (squared) activations rather than sit near 1.
RUNNING_STAT_BOUND = 1e12


def _short(x: float) -> str:
    """``1e4`` rather than ``1e+04``."""
    return f"{x:.0e}".replace("e+0", "e").replace("e+", "e")


def check_weights(state: Mapping[str, Any], name: str = "<checkpoint>") -> None:
    """Every floating-point tensor of a network state dict is finite and within
    :data:`WEIGHT_BOUND` (:data:`RUNNING_STAT_BOUND` for batch-norm running statistics): a
    corrupt checkpoint (flipped bytes) otherwise loads without complaint and its results look
    real.

    Raises:
        CheckpointError: ``"<name>: weight '<key>' holds non-finite values (...)"`` or
            ``"<name>: weight '<key>' has |w| up to 2.4e+24 (bound 1e4)"``.
    """
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.numel() == 0:
            continue
        v = value.detach()
        finite = torch.isfinite(v)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise CheckpointError(f"{name}: weight '{key}' holds non-finite values ({bad} of {v.numel()} NaN/Inf); "
                                  "the file is corrupt: use another checkpoint")
        bound = RUNNING_STAT_BOUND if str(key).endswith(("running_mean", "running_var")) else WEIGHT_BOUND
        top = float(v.abs().max())
        if top > bound:
            raise CheckpointError(f"{name}: weight '{key}' has |w| up to {top:.2g} (bound {_short(bound)}); "
                                  "the file is corrupt: use another checkpoint")


def find_latest_checkpoint(log_dir: str | Path) -> Path | None:
    """The newest (by modification time) ``<log_dir>/*/runs/*/checkpoints/last.ckpt`` across
    tasks, or None: what ``evaluate.py ckpt_path=last`` evaluates."""
    found = [p for p in Path(log_dir).expanduser().glob("*/runs/*/checkpoints/last.ckpt") if p.is_file()]
    return max(found, key=lambda p: (p.stat().st_mtime, str(p))) if found else None


def resolve_eval_checkpoint(ckpt_path: str | Path, log_dir: str | Path) -> tuple[str, bool]:
    """``(path, picked)``: ``"last"`` becomes :func:`find_latest_checkpoint` of ``log_dir``
    (``picked`` True), anything else is returned as given.

    Raises:
        CheckpointError: ``ckpt_path=last`` and no run under ``log_dir`` has a ``last.ckpt``.
    """
    if str(ckpt_path) != "last":
        return str(ckpt_path), False
    found = find_latest_checkpoint(log_dir)
    if found is None:
        raise CheckpointError(f"ckpt_path=last: no run with checkpoints/last.ckpt under {Path(log_dir)}/*/runs "
                              "(pass ckpt_path=<run>/checkpoints/last.ckpt, or set paths.log_dir)")
    return str(found), True


def _summarise_keys(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_network(path: str | Path, device: torch.device | str = "cpu",
                 overrides: Mapping[str, Any] | None = None) -> nn.Module:
    """Rebuild the network of a checkpoint, load its weights strictly, and put it in eval mode.

    Args:
        path: Lightning ``.ckpt`` or weights-only file (see the module docstring).
        device: where to put the network.
        overrides: settings over the checkpoint's, dotted or nested
            (``{"refine.robust_scale": 1e-4, "ransac.num_hypotheses": 2048}``), validated by
            :func:`bpnp.models.settings.merge_overrides`; a key that changes weight shapes fails
            the strict load.

    Returns:
        The network (``BlindPnPNet`` unless the config names another ``_target_``), in
        ``eval()`` mode, on ``device``.

    Raises:
        CheckpointError: missing or unreadable file, no network config, a config the network
            class rejects, or weights that do not fit it (missing/unexpected keys, shapes).
        SettingError: an override with an unknown key or a bad value (named).
    """
    return network_from_dict(load_checkpoint_dict(path), str(path), device, overrides)


def network_from_dict(ckpt: Mapping[str, Any], name: str = "<checkpoint>", device: torch.device | str = "cpu",
                      overrides: Mapping[str, Any] | None = None) -> nn.Module:
    """:func:`load_network` on a checkpoint dict already read by :func:`load_checkpoint_dict`
    (``name`` is the file named in errors); for callers that also need the dict's config."""
    state = _network_state(ckpt, name)
    check_weights(state, name)
    cfg = legacy_network_defaults(network_config(ckpt, name), state)
    if overrides:  # a bad override is the user's error, named by its key (SettingError), not the checkpoint's
        cfg = merge_overrides(cfg, overrides, prefix="net_overrides")
    try:
        net = build_net(cfg)
    except (TypeError, ValueError, ImportError, AttributeError) as exc:
        what = f"its config with the overrides {dict(overrides)}" if overrides else "its config"
        raise CheckpointError(f"{name}: incompatible checkpoint: cannot build the network from {what} ({exc})") from exc
    result = None
    try:
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        first = str(exc).strip().splitlines()
        detail = next((ln.strip() for ln in first if "size mismatch" in ln), first[-1] if first else str(exc))
        raise CheckpointError(f"{name}: incompatible checkpoint: {detail}") from exc
    if result.missing_keys or result.unexpected_keys:
        parts = []
        if result.missing_keys:
            parts.append(f"missing weights {_summarise_keys(list(result.missing_keys))}")
        if result.unexpected_keys:
            parts.append(f"unexpected weights {_summarise_keys(list(result.unexpected_keys))}")
        raise CheckpointError(f"{name}: incompatible checkpoint: " + "; ".join(parts))
    return net.to(device).eval()


def save_weights_only(path: str | Path, net: nn.Module, config: Mapping[str, Any]) -> Path:
    """Write ``{"state_dict": net.state_dict(), "config": dict(config)}`` (loadable by
    :func:`load_network` with ``weights_only=True``). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
                "config": dict(config)}, path)
    return path


def _parse_value(text: str):
    """int, then float (YAML 1.1 reads ``1e-4`` as a string), then YAML (booleans, strings)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def parse_set_overrides(items: list[str]) -> dict[str, Any]:
    """``["KEY=VALUE", ...]`` (the ``--set`` options of the command-line tools, dotted keys such as
    ``refine.robust_scale=1e-4``) -> overrides for :func:`load_network`. Raises ValueError on an
    item without ``=`` or key."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip()] = _parse_value(value)
    return out


def state_dict_mismatch(model_state: dict, ckpt_state: dict, limit: int = 3) -> str | None:
    """None if ``ckpt_state`` fits ``model_state`` exactly (same keys and shapes), else a short
    description of the first differences."""
    missing = [k for k in model_state if k not in ckpt_state]
    unexpected = [k for k in ckpt_state if k not in model_state]
    shapes = [f"{k} {tuple(ckpt_state[k].shape)} vs {tuple(model_state[k].shape)}"
              for k in model_state if k in ckpt_state and hasattr(ckpt_state[k], "shape")
              and tuple(ckpt_state[k].shape) != tuple(model_state[k].shape)]

    def few(xs: list[str]) -> str:
        return ", ".join(xs[:limit]) + (f", ... ({len(xs)} in all)" if len(xs) > limit else "")

    parts = []
    if shapes:
        parts.append(f"shape mismatch (checkpoint vs model) {few(shapes)}")
    if missing:
        parts.append(f"missing weights {few(missing)}")
    if unexpected:
        parts.append(f"unexpected weights {few(unexpected)}")
    return "; ".join(parts) or None


#: Network settings that change what the weights compute without changing their shapes, so that
#: a weights-only load cannot notice a mismatch (keys and shapes are checked separately).
WEIGHT_MEANING_KEYS = ("knn_scale", "normalize_3d", "cn_eps")


def net_config_mismatch(model_net: Any, ckpt_net: Any) -> str | None:
    """None if the network settings of :data:`WEIGHT_MEANING_KEYS` agree between the model's
    config and a checkpoint's (a key absent on either side is the ``BlindPnPNet`` default; the
    stem's scale only matters with a stem), else a short description naming the override that
    would make them agree."""
    import inspect

    from bpnp.models.network import BlindPnPNet

    defaults = {k: p.default for k, p in inspect.signature(BlindPnPNet).parameters.items()}
    model_net, ckpt_net = dict(model_net or {}), dict(ckpt_net or {})

    def get(cfg: dict, key: str) -> Any:
        return cfg.get(key, defaults.get(key))

    diffs = []
    for key in WEIGHT_MEANING_KEYS:
        if key == "knn_scale" and not (get(model_net, "knn") and get(ckpt_net, "knn")):
            continue
        ours, theirs = get(model_net, key), get(ckpt_net, key)
        if ours != theirs:
            diffs.append(f"model.net.{key}={ours!r} but the checkpoint's network has {theirs!r} "
                         f"(override model.net.{key}={theirs})")
    return "; ".join(diffs) or None
