"""Preference losses: each against a per-element float64 reference, identities, gradients, registry."""

from __future__ import annotations

import math

import pytest
import torch

from distill.losses.preference import (
    PREFERENCE_LOSSES,
    UnknownPreferenceLossError,
    get_preference_loss,
    preference_loss,
    register_preference_loss,
    rewards,
    robust,
    sigmoid,
)


def _logsig(x: float) -> float:
    # Both branches stay finite for |x| in the thousands.
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _ref_sigmoid(h, beta=0.1, label_smoothing=0.0):
    return -(1 - label_smoothing) * _logsig(beta * h) - label_smoothing * _logsig(-beta * h)


def _ref_robust(h, beta=0.1, label_smoothing=0.0):
    eps = label_smoothing
    return (-(1 - eps) * _logsig(beta * h) + eps * _logsig(-beta * h)) / (1 - 2 * eps)


REFERENCES = {
    "sigmoid": _ref_sigmoid,
    "robust": _ref_robust,
    "ipo": lambda h, beta=0.1: (h - 1 / (2 * beta)) ** 2,
    "hinge": lambda h, beta=0.1: max(0.0, 1 - beta * h),
}
CASES = [
    ("sigmoid", {}), ("sigmoid", {"beta": 0.5}), ("sigmoid", {"label_smoothing": 0.1}),
    ("sigmoid", {"beta": 2.0, "label_smoothing": 0.3}),
    ("robust", {}), ("robust", {"label_smoothing": 0.2}), ("robust", {"beta": 0.5, "label_smoothing": 0.45}),
    ("ipo", {}), ("ipo", {"beta": 1.0}),
    ("hinge", {}), ("hinge", {"beta": 2.0}),
]
CASE_IDS = [name + "".join(f"-{k}{v}" for k, v in kw.items()) for name, kw in CASES]


def _logps(batch=7, seed=0, scale=20.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [(-scale * torch.rand(batch, generator=g, dtype=torch.float64)).to(dtype) for _ in range(4)]


def test_every_registered_loss_has_a_reference() -> None:
    assert set(PREFERENCE_LOSSES) >= set(REFERENCES)
    assert {name for name, _ in CASES} == set(REFERENCES)


@pytest.mark.parametrize("name,kwargs", CASES, ids=CASE_IDS)
def test_matches_reference(name, kwargs) -> None:
    logps = _logps()
    out = get_preference_loss(name)(*logps, **kwargs)
    assert out.shape == (7,) and out.dtype == torch.float64
    pc, pr, rc, rr = (x.tolist() for x in logps)
    expected = [REFERENCES[name]((a - b) - (c - d), **kwargs) for a, b, c, d in zip(pc, pr, rc, rr)]
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert torch.equal(preference_loss(name, *logps, **kwargs), out)


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_low_precision_is_upcast_and_extremes_stay_finite(name) -> None:
    logps = _logps(dtype=torch.bfloat16)
    out = get_preference_loss(name)(*logps)
    assert out.dtype == torch.float32
    pc, pr, rc, rr = (x.float().tolist() for x in logps)
    expected = [REFERENCES[name]((a - b) - (c - d)) for a, b, c, d in zip(pc, pr, rc, rr)]
    torch.testing.assert_close(out, torch.tensor(expected), rtol=1e-5, atol=1e-5)
    # Margins of +-2e4 nats: logsigmoid must not overflow to inf.
    big = torch.tensor([1e4, -1e4], dtype=torch.float32)
    zero = torch.zeros(2)
    huge = get_preference_loss(name)(big, -big, zero, zero, beta=1.0)
    assert torch.isfinite(huge).all()


def test_robust_without_smoothing_is_sigmoid() -> None:
    logps = _logps(seed=3)
    torch.testing.assert_close(robust(*logps, label_smoothing=0.0), sigmoid(*logps), rtol=0, atol=0)
    # With smoothing they differ; robust can go negative once the margin is large.
    assert not torch.allclose(robust(*logps, label_smoothing=0.2), sigmoid(*logps, label_smoothing=0.2))
    wide = torch.tensor([100.0], dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    assert robust(wide, zero, zero, zero, beta=1.0, label_smoothing=0.2).item() < 0


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_gradient_signs(name) -> None:
    # At a zero margin every loss still wants to raise chosen and lower rejected log-probs.
    pc, pr, rc, rr = (torch.zeros(3, dtype=torch.float64, requires_grad=True) for _ in range(4))
    get_preference_loss(name)(pc, pr, rc, rr, beta=0.5).sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()
    # The reference is a constant: only the policy gets pushed in opposite directions.
    assert (rc.grad > 0).all() and (rr.grad < 0).all()


def test_raising_chosen_logp_lowers_sigmoid_loss() -> None:
    pc, pr, rc, rr = _logps(seed=1)
    assert (sigmoid(pc + 1.0, pr, rc, rr) < sigmoid(pc, pr, rc, rr)).all()
    assert (sigmoid(pc, pr + 1.0, rc, rr) > sigmoid(pc, pr, rc, rr)).all()


def test_conservative_dpo_stops_at_a_finite_margin() -> None:
    # Smoothing eps makes the optimum beta * h = log((1 - eps) / eps) instead of infinity.
    beta, eps = 0.1, 0.1
    pc = torch.tensor([math.log((1 - eps) / eps) / beta], dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(1, dtype=torch.float64)
    sigmoid(pc, zero, zero, zero, beta=beta, label_smoothing=eps).sum().backward()
    assert abs(pc.grad.item()) < 1e-12


def test_hinge_is_flat_past_the_margin() -> None:
    pc = torch.tensor([30.0], requires_grad=True)
    zero = torch.zeros(1)
    loss = get_preference_loss("hinge")(pc, zero, zero, zero, beta=0.1)
    loss.sum().backward()
    assert loss.item() == 0 and pc.grad.item() == 0


def test_rewards_are_scaled_and_detached() -> None:
    policy = torch.tensor([-3.0, -5.0], requires_grad=True)
    ref = torch.tensor([-4.0, -4.0], dtype=torch.bfloat16)
    r = rewards(policy, ref, beta=0.5)
    assert not r.requires_grad and r.dtype == torch.float32
    torch.testing.assert_close(r, torch.tensor([0.5, -0.5]))


@pytest.mark.parametrize("kwargs,match", [
    ({"beta": 0.0}, "beta must be > 0"),
    ({"beta": -1.0}, "beta must be > 0"),
    ({"label_smoothing": 0.5}, r"label_smoothing must be in \[0, 0.5\)"),
    ({"label_smoothing": -0.1}, "label_smoothing"),
])
def test_bad_parameters(kwargs, match) -> None:
    for name in ("sigmoid", "robust"):
        with pytest.raises(ValueError, match=match):
            get_preference_loss(name)(*_logps(), **kwargs)
    with pytest.raises(ValueError, match="beta must be > 0"):
        rewards(torch.zeros(1), torch.zeros(1), beta=0.0)


@pytest.mark.parametrize("name", ["ipo", "hinge"])
def test_smoothing_refused_where_undefined(name) -> None:
    with pytest.raises(ValueError, match="has no label_smoothing"):
        get_preference_loss(name)(*_logps(), label_smoothing=0.1)


def test_shape_mismatch() -> None:
    pc, pr, rc, rr = _logps()
    with pytest.raises(ValueError, match=r"four \[B\] log-prob tensors"):
        sigmoid(pc, pr[:3], rc, rr)
    with pytest.raises(ValueError, match=r"four \[B\] log-prob tensors"):
        sigmoid(*(x.reshape(7, 1) for x in (pc, pr, rc, rr)))


def test_registry_errors_and_override() -> None:
    with pytest.raises(UnknownPreferenceLossError, match="Did you mean 'sigmoid'") as info:
        get_preference_loss("sigmod")
    assert isinstance(info.value, ValueError) and isinstance(info.value, KeyError)
    assert "Registered: hinge, ipo, robust, sigmoid" in str(info.value)
    assert not str(info.value).startswith("'")

    with pytest.raises(ValueError, match="already registered"):
        register_preference_loss("sigmoid")(lambda *a, **k: None)
    original = PREFERENCE_LOSSES["sigmoid"]
    try:
        @register_preference_loss("sigmoid", override=True)
        def doubled(*logps, **kw):
            return 2 * original(*logps, **kw)

        assert get_preference_loss("sigmoid") is doubled
        logps = _logps()
        torch.testing.assert_close(preference_loss("sigmoid", *logps), 2 * original(*logps))
    finally:
        PREFERENCE_LOSSES["sigmoid"] = original
