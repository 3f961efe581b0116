"""The failure diagnostic (bpnp.evaluation.failures): its counts on a network that fails."""

from __future__ import annotations

from bpnp.evaluation.failures import diagnose, format_table, main
from bpnp.runtime.checkpoint import save_weights_only
from tests.evaluation.conftest import TINY_NET, noise_free_scenes


def _random_net():
    import torch

    from bpnp.models.network import BlindPnPNet

    torch.manual_seed(0)
    cfg = {**TINY_NET, "search": {"enabled": True, "hypotheses": 2, "rerank_pool": 8}}
    return BlindPnPNet(**cfg), cfg


def test_an_untrained_matcher_fails_by_search_not_by_score():
    """A random network's P says nothing, so it fails noise-free instances; the true pose then
    explains every point, more than any chosen pose: each failure is counted as one of search."""
    net, _ = _random_net()
    r = diagnose(net, noise_free_scenes(3, seed=1))
    assert r["n"] == 3 and r["success"] + r["failures"] == 3 and r["failures"] >= 1
    assert r["truth_scores_higher"] == r["failures"]
    assert len(r["consensus_true"]) == r["failures"]
    assert all(t > c for t, c in zip(r["consensus_true"], r["consensus_chosen"]))
    assert 0 <= r["near_in_starts"] <= r["near_start"] <= r["failures"]
    table = format_table([("set", r)])
    assert table.splitlines()[2].startswith("| set | 3 |")


def test_cli(tmp_path, capsys):
    from bpnp.data.scenes import save_scene

    net, cfg = _random_net()
    ckpt = save_weights_only(tmp_path / "w.pt", net, cfg)
    scenes = tmp_path / "val"
    scenes.mkdir()
    for i, sc in enumerate(noise_free_scenes(2)):
        save_scene(scenes / f"{i:03d}.npz", sc)
    assert main(["--ckpt", str(ckpt), "--scenes", str(scenes)]) == 0
    assert "| val | 2 |" in capsys.readouterr().out
    assert main(["--ckpt", str(tmp_path / "missing.pt"), "--scenes", str(scenes)]) == 2
    assert "missing.pt" in capsys.readouterr().err
