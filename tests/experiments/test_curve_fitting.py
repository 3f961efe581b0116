"""Polynomial curve fitting through the least-squares node."""

import numpy as np
import torch

from bpnp.experiments import curve_fitting as cf
from bpnp.experiments._checks import rel_err


def test_exact_polynomial_is_recovered():
    t = torch.linspace(-1, 1, 9, dtype=torch.float64)[None]
    a = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    y = cf.vandermonde(t, 2) @ a
    torch.testing.assert_close(cf.fit(t, y, 2)[0], a, rtol=1e-12, atol=1e-12)


def test_fit_matches_polyfit_and_jacobians():
    t, y, _ = cf.make_data(m=12, seed=1)
    a = cf.fit(t, y, 3)
    ref = np.polyfit(t[0].numpy(), y[0].numpy(), 3)[::-1]
    np.testing.assert_allclose(a[0].numpy(), ref, rtol=1e-10, atol=1e-12)
    J = cf.jacobian_wrt_y(t, y, 3)
    assert rel_err(J, torch.linalg.pinv(cf.vandermonde(t, 3)[0])) < 1e-10
    v = torch.randn(1, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g, fd = cf.finite_difference_t(t, y, 3, v)
    assert rel_err(g, fd) < 1e-7


def test_gradcheck_in_t_and_y():
    t, y, _ = cf.make_data(m=6, seed=2)
    t.requires_grad_(True)
    y.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t, y: cf.fit(t, y, 2), (t, y))


def test_main(capsys, tmp_path):
    checks = cf.main(["--m", "10", "--plot", str(tmp_path / "fit.png")])
    out = capsys.readouterr().out
    assert checks.ok, out
    assert out.count("[PASS]") == 3 and (tmp_path / "fit.png").stat().st_size > 0
