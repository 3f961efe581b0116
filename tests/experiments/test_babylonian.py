"""Babylonian square root: unrolled vs implicit derivative vs the closed form 1/(2 sqrt x)."""

import torch

from bpnp.experiments import babylonian as bab


def test_converged_derivatives_equal_closed_form():
    x = torch.tensor([0.05, 0.7, 2.0, 30.0], dtype=torch.float64)
    d = bab.derivatives(x, 12)
    for k in ("unrolled", "implicit", "bckfcn"):
        torch.testing.assert_close(d[k], 0.5 / x.sqrt(), rtol=1e-12, atol=0)


def test_before_convergence_unrolled_lags_and_implicit_is_half_inverse_iterate():
    x = torch.tensor([2.0], dtype=torch.float64)
    d = bab.derivatives(x, 2)
    # unrolled: derivative of the 2nd iterate (17/12 - ...); implicit: 1/(2 y_2) exactly
    assert abs(float(d["unrolled"] - d["closed_form"])) > 1e-3
    torch.testing.assert_close(d["implicit"], 0.5 / d["y"], rtol=1e-14, atol=0)
    torch.testing.assert_close(d["unrolled"], torch.tensor([25 / 72], dtype=torch.float64), rtol=1e-14, atol=0)


def test_handwritten_bckfcn_equals_autograd():
    x = torch.tensor([0.3, 5.0], dtype=torch.float64)
    for T in range(6):
        d = bab.derivatives(x, T)
        torch.testing.assert_close(d["bckfcn"], d["unrolled"], rtol=1e-13, atol=0)


def test_gradcheck_implicit_node():
    x = torch.tensor([0.4, 3.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(bab.BabylonianSqrt(12), (x,))


def test_main(capsys):
    checks = bab.main([])
    out = capsys.readouterr().out
    assert checks.ok, out
    assert out.count("[PASS]") == 5 and "FAIL" not in out
