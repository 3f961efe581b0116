"""The shift suite and the validation shifts (bpnp.data.shift_suite): every value lies outside
what training draws (the main job and its continuations), the validation shifts use the validation meshes and
their own seed and never a suite value, and a set exports."""

import json
from pathlib import Path

import pytest
import yaml

from bpnp.data import shift_suite as ss

ROOT = Path(__file__).resolve().parents[2]
RANGED = ("fov_deg", "view_fill", "scene_distance", "noise_px")
# One fixed camera for every instance is the shift there (its 65 degrees are inside training's).
SAME_VALUE_BY_DESIGN = {"fixed_camera": {"fov_deg"}, "combined": {"fov_deg"}}


def _training_ranges():
    """key -> [(lo, hi), ...] of the main job and its continuation (configs/experiment)."""
    out: dict[str, list[tuple[float, float]]] = {}
    for name in ("bpnp_synthetic", "bpnp_synthetic_continue", "bpnp_synthetic_heavy"):
        synth = yaml.safe_load((ROOT / "configs" / "experiment" / f"{name}.yaml").read_text())["data"]["synthetic"]
        for key in RANGED:
            if key in (synth or {}):
                out.setdefault(key, []).append(tuple(synth[key]))
    return out


def _args(name, frac=0.25):
    args = ss.export_args(name, frac, Path("/tmp/unused"))
    sets = dict(a.split("=", 1) for a in args[args.index("--set"):][1::2])
    return args, {k: json.loads(v) for k, v in sets.items()}


@pytest.mark.parametrize("name", [*ss.SHIFT_SUITE, *ss.VALIDATION_SHIFTS])
def test_every_shifted_value_lies_outside_training(name):
    ranges = _training_ranges()
    _, sets = _args(name)
    shifted = ss.SHIFT_SUITE.get(name) or ss.VALIDATION_SHIFTS[name]
    for key, value in shifted.items():
        if key in SAME_VALUE_BY_DESIGN.get(name, ()):
            continue
        for lo, hi in ranges.get(key, []):
            assert not lo <= value <= hi, f"{name}: {key}={value} is inside training's [{lo}, {hi}]"
        assert sets[key] == value


def test_validation_shifts_use_validation_meshes_their_seed_and_no_suite_value():
    suite_values = {(k, json.dumps(v)) for s in ss.SHIFT_SUITE.values() for k, v in s.items()}
    for name, shifted in ss.VALIDATION_SHIFTS.items():
        args, sets = _args(name)
        assert args[args.index("--seed") + 1] == str(ss.VALIDATION_SEED) != str(ss.SEED)
        assert sets["mesh_split"] == "val"
        assert not {(k, json.dumps(v)) for k, v in shifted.items()} & suite_values
    for name in ss.SHIFT_SUITE:
        args, sets = _args(name)
        assert args[args.index("--seed") + 1] == str(ss.SEED) and sets["mesh_split"] == "test_unseen_meshes"
    with pytest.raises(KeyError, match="unknown shift-suite set"):
        ss.export_args("fov_21", 0.25, Path("/tmp/unused"))


def test_a_validation_shift_exports(tmp_path):
    assert ss.main(["--validation", "--only", "fov_22", "--fracs", "0.5", "--num", "2", "--out", str(tmp_path)]) == 0
    out = tmp_path / "fov_22_out0.5"
    assert (out / "index.json").is_file() and len(list(out.glob("*.npz"))) == 2
