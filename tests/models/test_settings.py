"""The network's settings: one default per setting, validated with the key named, old flat
checkpoints' names moved into their groups."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bpnp.models.network import BlindPnPNet
from bpnp.models.settings import (GROUPS, KERNELS, LEGACY_KEYS, SettingError, check_net_config, merge_overrides,
                                  upgrade_flat_config)

ROOT = Path(__file__).resolve().parents[2]


def test_the_config_restates_the_code_defaults():
    """configs/model/bpnp.yaml lists every group setting (a researcher sees every knob) with the
    value the dataclass owns: one default per setting."""
    net = yaml.safe_load((ROOT / "configs" / "model" / "bpnp.yaml").read_text())["net"]
    for name, cls in GROUPS.items():
        assert net[name] == cls().to_dict(), name


def test_kernel_names_are_the_nodes():
    from bpnp.nodes.robust import KERNELS as NODE_KERNELS

    assert KERNELS == NODE_KERNELS


def test_schur_solver_names_are_the_nodes():
    from bpnp.models.settings import SCHUR_SOLVERS
    from bpnp.nodes.sinkhorn import SCHUR_SOLVERS as NODE_SOLVERS

    assert SCHUR_SOLVERS == NODE_SOLVERS


@pytest.mark.parametrize("cfg, message", [
    ({"sinkhorn": {"lam": "abc"}}, "model.net.sinkhorn.lam: expected a number > 0, got 'abc'"),
    ({"sinkhorn": {"lam": 0}}, "model.net.sinkhorn.lam: expected a number > 0, got 0"),
    ({"sinkhorn": {"bins": "both"}}, "model.net.sinkhorn.bins: expected one of none, shared, per_side, got 'both'"),
    ({"ransac": {"num_hypotheses": 2.5}}, "model.net.ransac.num_hypotheses: expected an integer >= 1, got 2.5"),
    ({"ransac": {"top_k": 0}}, "model.net.ransac.top_k: expected an integer >= 1 or null, got 0"),
    ({"ransac": {"guided": 1.5}}, "model.net.ransac.guided: expected a number >= 0 and <= 1, got 1.5"),
    ({"ransac": {"guided_neighbours": 2}}, "model.net.ransac.guided_neighbours: expected an integer >= 3, got 2"),
    ({"ransac": {"sample_power": 0}}, "model.net.ransac.sample_power: expected a number > 0, got 0"),
    ({"gates": {"reference": 0}}, "model.net.gates.reference: expected a number > 0, got 0"),
    ({"gates": {"min_factor": 2.0, "max_factor": 1.0}}, "model.net.gates.min_factor: 2.0 exceeds max_factor 1.0"),
    ({"refine": {"robust_scal": 1e-4}}, "model.net.refine.robust_scal: unknown setting (known: robust, robust_scale"),
    ({"refine": {"in_training": "yes"}}, "model.net.refine.in_training: expected true or false, got 'yes'"),
    ({"refine": {"gate": float("nan")}}, "model.net.refine.gate: expected a number > 0 and < 1.5708 or null, got nan"),
    ({"refine": 3}, "model.net.refine: expected a mapping of RefineSettings settings, got 3"),
    ({"feature_dim": -4}, "model.net.feature_dim: expected an integer >= 1, got -4"),
    ({"matcher": "transformer"}, "model.net.matcher: expected one of attention, bpnpnet, got 'transformer'"),
    ({"robust_scale": 1e-4}, "model.net.robust_scale: renamed, use model.net.refine.robust_scale"),
    ({"colour": 1}, "model.net.colour: unknown network setting (known: matcher, "),
])
def test_bad_values_name_the_key(cfg, message):
    with pytest.raises(SettingError) as e:
        check_net_config(cfg)
    assert str(e.value).startswith(message), str(e.value)


def test_valid_config_is_normalised_and_builds():
    cfg = check_net_config({"feature_dim": 8.0, "depth": 1, "ransac": {"num_hypotheses": 16.0}, "refine": {"gate": 0.05}})
    assert cfg == {"feature_dim": 8, "depth": 1, "ransac": {"num_hypotheses": 16}, "refine": {"gate": 0.05}}
    assert isinstance(cfg["ransac"]["num_hypotheses"], int)
    net = BlindPnPNet(**cfg)
    assert net.ransac_kwargs["num_hypotheses"] == 16 and net.refine_gate == 0.05
    assert net.settings()["refine"]["robust"] == "geman_mcclure"


def test_the_constructor_validates_too():
    with pytest.raises(SettingError, match=r"^BlindPnPNet\.sinkhorn\.lam: expected a number > 0"):
        BlindPnPNet(feature_dim=8, depth=1, sinkhorn={"lam": -1})
    with pytest.raises(SettingError, match=r"^BlindPnPNet\.backward: expected one of implicit, unrolled"):
        BlindPnPNet(feature_dim=8, depth=1, backward="autograd")


def test_configure_updates_the_current_settings():
    net = BlindPnPNet(feature_dim=8, depth=1, refine={"gate": 0.05, "robust_scale": 1e-4})
    net.configure(refine={"robust_scale": 5e-5})
    assert net.refine_gate == 0.05 and net.pnp.kernel.scale == 5e-5  # the gate is kept
    with pytest.raises(SettingError, match="refine.max_iter"):
        net.configure(refine={"max_iter": 0})


def test_flat_checkpoint_configs_are_upgraded():
    flat = {"feature_dim": 8, "lam": 20.0, "bins": "none", "robust_scale": 5e-5, "ransac_hypotheses": 2048,
            "refine_gate": 0.05, "pnp_max_iter": 30, "refine": {"top_k": 4}}
    up = upgrade_flat_config(flat)
    assert up == {"feature_dim": 8, "sinkhorn": {"lam": 20.0, "bins": "none"},
                  "refine": {"top_k": 4, "robust_scale": 5e-5, "gate": 0.05, "max_iter": 30},
                  "ransac": {"num_hypotheses": 2048}}
    check_net_config(up)
    assert all(group in GROUPS for group, _ in LEGACY_KEYS.values())


def test_merge_overrides_dotted_and_nested():
    base = {"feature_dim": 8, "refine": {"gate": 0.05}}
    out = merge_overrides(base, {"refine.robust_scale": 1e-4, "ransac": {"num_hypotheses": 64}})
    assert out == {"feature_dim": 8, "refine": {"gate": 0.05, "robust_scale": 1e-4}, "ransac": {"num_hypotheses": 64}}
    assert base == {"feature_dim": 8, "refine": {"gate": 0.05}}  # not modified
    with pytest.raises(SettingError, match=r"^x\.refin\.gate: unknown group 'refin'"):
        merge_overrides(base, {"refin.gate": 0.1}, prefix="x")


def test_the_node_and_the_application_share_the_kernel_scale_default():
    """PnPRefine's own default scale (used when the node is imported alone) is the application's."""
    import inspect

    from bpnp.models.settings import RefineSettings
    from bpnp.nodes import PnPRefine

    assert inspect.signature(PnPRefine).parameters["robust_scale"].default == RefineSettings().robust_scale
