"""The printed-check helper that every example's ``main`` returns."""

import torch

from bpnp.experiments._checks import Checks, rel_err


def test_checks_pass_fail_and_summary(capsys):
    c = Checks()
    assert c.add("small", 1e-9, 1e-6)
    assert not c.add("large", 1e-3, 1e-6)
    assert c.add("factor", 12.0, 10.0, at_least=True)
    assert not c.ok
    assert c["large"] == 1e-3
    out = capsys.readouterr().out
    assert "[PASS] small" in out and "[FAIL] large" in out
    assert c.summary() == "2/3 checks passed; failed: large"


def test_rel_err():
    a = torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert rel_err(a, a) == 0.0
    assert abs(rel_err(a + torch.tensor([0.0, 0.1], dtype=torch.float64), a) - 0.1 / 5**0.5) < 1e-15
