"""KD loss registry: every loss against a slow float64 reference, identities, gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distill.losses import (
    IGNORE_INDEX,
    KD_LOSSES,
    count_valid,
    cross_entropy,
    forward_kl,
    generalized_jsd,
    get_kd_loss,
    kd_loss,
    register_kd_loss,
    reverse_kl,
)

# Extra parameter settings exercised per loss, on top of its defaults.
EXTRA_KWARGS = {
    "generalized_jsd": [{"beta": 0.3}, {"beta": 0.9}, {"beta": 0.0}, {"beta": 1.0}],
    "skew_forward_kl": [{"alpha": 0.5}, {"alpha": 0.0}],
    "skew_reverse_kl": [{"alpha": 0.5}, {"alpha": 0.0}],
}
CASES = [(name, {}) for name in KD_LOSSES] + [
    (name, kw) for name in KD_LOSSES for kw in EXTRA_KWARGS.get(name, [])
]
CASE_IDS = [name + "".join(f"-{k}{v}" for k, v in kw.items()) for name, kw in CASES]


# ---------------------------------------------------------------- reference
def _softmax(xs, support):
    m = max(xs[v] for v in support)
    e = {v: math.exp(xs[v] - m) for v in support}
    z = sum(e.values())
    return [e[v] / z if v in e else 0.0 for v in range(len(xs))]


def _kl(a, b):
    return sum(a[v] * math.log(a[v] / b[v]) for v in range(len(a)) if a[v] > 0)


def _mix(a, b, w):
    return [w * x + (1 - w) * y for x, y in zip(a, b)]


def _jsd(p, q, q_top, beta=0.5):
    if beta == 0:
        return _kl(p, q)
    if beta == 1:
        return _kl(q_top, p)
    m = _mix(p, q, beta)
    return beta * _kl(p, m) + (1 - beta) * _kl(q, m)


# Each takes teacher probs p, student probs q, and the student renormalised over the
# teacher's top-k support (q_top == q without top_k).
REFERENCES = {
    "forward_kl": lambda p, q, q_top: _kl(p, q),
    "reverse_kl": lambda p, q, q_top: _kl(q_top, p),
    "generalized_jsd": _jsd,
    "skew_forward_kl": lambda p, q, q_top, alpha=0.1: _kl(p, q) if alpha == 0 else _kl(p, _mix(p, q, alpha)),
    "skew_reverse_kl": lambda p, q, q_top, alpha=0.1: _kl(q_top, p) if alpha == 0 else _kl(q, _mix(q, p, alpha)),
    "tvd": lambda p, q, q_top: 0.5 * sum(abs(x - y) for x, y in zip(p, q)),
}


def reference(name, student, teacher, labels, *, temperature=1.0, top_k=None, num_valid_tokens=None, **kw):
    s = student.detach().double().reshape(-1, student.shape[-1]).tolist()
    t = teacher.detach().double().reshape(-1, teacher.shape[-1]).tolist()
    labels = labels.reshape(-1).tolist()
    vocab = min(len(s[0]), len(t[0]))
    total, count = 0.0, 0
    for i, label in enumerate(labels):
        if label == IGNORE_INDEX:
            continue
        count += 1
        si = [x / temperature for x in s[i][:vocab]]
        ti = [x / temperature for x in t[i][:vocab]]
        everything = list(range(vocab))
        support = sorted(everything, key=lambda v: -ti[v])[:top_k] if top_k else everything
        p = _softmax(ti, support)
        q = _softmax(si, everything)
        q_top = _softmax(si, support)
        total += REFERENCES[name](p, q, q_top, **kw) * temperature**2
    return total / (num_valid_tokens if num_valid_tokens is not None else max(count, 1))


# ---------------------------------------------------------------- fixtures
def make_inputs(b=2, t=6, v_s=13, v_t=13, dtype=torch.float64, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(b, t, v_s, generator=g) * scale).to(dtype).requires_grad_()
    teacher = (torch.randn(b, t, v_t, generator=g) * scale).to(dtype)
    labels = torch.randint(0, min(v_s, v_t), (b, t), generator=g)
    labels.view(-1)[1::5] = IGNORE_INDEX
    return student, teacher, labels


@pytest.fixture
def scratch_registry():
    """Lets a test register losses without leaking them into the rest of the session."""
    before = dict(KD_LOSSES)
    yield
    KD_LOSSES.clear()
    KD_LOSSES.update(before)


# ---------------------------------------------------------------- reference tests
def test_every_loss_has_reference():
    missing = set(KD_LOSSES) - set(REFERENCES)
    assert not missing, f"add a slow reference for {sorted(missing)} to tests/losses/test_losses.py"


SETTINGS = {
    "plain": dict(),
    "temperature": dict(temperature=2.0),
    "top_k": dict(top_k=4),
    "temperature+top_k": dict(temperature=0.7, top_k=3),
    "top_k>=V": dict(top_k=50),
    "vocab_pad_teacher": dict(v_t=16),
    "vocab_pad_student": dict(v_s=16, top_k=5),
}


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize(("name", "kw"), CASES, ids=CASE_IDS)
def test_matches_reference(name, kw, setting):
    opts = dict(SETTINGS[setting])
    shape = {k: opts.pop(k) for k in ("v_s", "v_t") if k in opts}
    student, teacher, labels = make_inputs(**shape)
    got = kd_loss(name, student, teacher, labels, **opts, **kw)
    want = reference(name, student, teacher, labels, **opts, **kw)
    assert got.dtype == torch.float64
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(want, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize(("name", "kw"), CASES, ids=CASE_IDS)
def test_flat_and_batched_shapes_agree(name, kw):
    student, teacher, labels = make_inputs()
    batched = kd_loss(name, student, teacher, labels, **kw)
    flat = kd_loss(name, student.reshape(-1, 13), teacher.reshape(-1, 13), labels.reshape(-1), **kw)
    torch.testing.assert_close(batched, flat)


# ---------------------------------------------------------------- identities
@pytest.mark.parametrize(("name", "kw"), CASES, ids=CASE_IDS)
def test_zero_when_student_equals_teacher(name, kw):
    student, _, labels = make_inputs()
    loss = kd_loss(name, student, student.detach().clone(), labels, **kw)
    assert abs(loss.item()) < 1e-12
    (grad,) = torch.autograd.grad(loss, student)
    assert grad.abs().max() < 1e-10


def test_generalized_jsd_endpoints_are_the_kls():
    student, teacher, labels = make_inputs()
    for opts in ({}, {"top_k": 4, "temperature": 1.5}):
        assert torch.equal(generalized_jsd(student, teacher, labels, beta=0.0, **opts),
                           forward_kl(student, teacher, labels, **opts))
        assert torch.equal(generalized_jsd(student, teacher, labels, beta=1.0, **opts),
                           reverse_kl(student, teacher, labels, **opts))


@pytest.mark.parametrize(("name", "param"), [("generalized_jsd", "beta"), ("skew_forward_kl", "alpha"),
                                             ("skew_reverse_kl", "alpha")])
@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_mixture_weight_validated(name, param, value):
    student, teacher, labels = make_inputs()
    with pytest.raises(ValueError, match=param):
        kd_loss(name, student, teacher, labels, **{param: value})


# ---------------------------------------------------------------- gradients / numerics
@pytest.mark.parametrize("top_k", [None, 3])
@pytest.mark.parametrize(("name", "kw"), CASES, ids=CASE_IDS)
def test_gradcheck(name, kw, top_k):
    student, teacher, labels = make_inputs(b=1, t=3, v_s=6, v_t=6, scale=1.0, seed=1)
    fn = get_kd_loss(name)
    assert torch.autograd.gradcheck(
        lambda s: fn(s, teacher, labels, temperature=1.3, top_k=top_k, **kw), (student,)
    )


@pytest.mark.parametrize(("name", "kw"), CASES, ids=CASE_IDS)
def test_bf16_is_finite_and_close_to_fp32(name, kw):
    student, teacher, labels = make_inputs(t=32, v_s=64, v_t=64, dtype=torch.float32)
    s16 = student.detach().bfloat16().requires_grad_()
    t16 = teacher.bfloat16()
    got = kd_loss(name, s16, t16, labels, **kw)
    want = kd_loss(name, s16.detach().float(), t16.float(), labels, **kw)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got.backward()
    assert torch.isfinite(s16.grad.float()).all()


@pytest.mark.parametrize(("name", "kw"), CASES, ids=CASE_IDS)
def test_extreme_logits_stay_finite(name, kw):
    student, teacher, labels = make_inputs(dtype=torch.float32, scale=1e4)
    loss = kd_loss(name, student, teacher, labels, top_k=5, **kw)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


@pytest.mark.parametrize(("name", "kw"), CASES, ids=CASE_IDS)
def test_divides_by_given_num_valid_tokens(name, kw):
    student, teacher, labels = make_inputs()
    local = count_valid(labels).item()
    default = kd_loss(name, student, teacher, labels, **kw)
    for n in (7, torch.tensor(7), torch.tensor(7.0)):
        given = kd_loss(name, student, teacher, labels, num_valid_tokens=n, **kw)
        torch.testing.assert_close(given * 7, default * local)


@pytest.mark.parametrize(("name", "kw"), CASES, ids=CASE_IDS)
def test_all_ignored_is_zero_with_zero_grad(name, kw):
    student, teacher, labels = make_inputs()
    labels = torch.full_like(labels, IGNORE_INDEX)
    loss = kd_loss(name, student, teacher, labels, top_k=3, **kw)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(student.grad) == 0


def test_cross_entropy_and_count_valid():
    student, _, labels = make_inputs(dtype=torch.float32)
    n = count_valid(labels)
    assert n.dtype == torch.int64 and n.item() == labels.numel() - 3
    want = F.cross_entropy(student.reshape(-1, 13), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(cross_entropy(student, labels), want)
    torch.testing.assert_close(cross_entropy(student, labels, num_valid_tokens=5), want * n / 5)
    bf = cross_entropy(student.detach().bfloat16(), labels)
    assert bf.dtype == torch.float32
    assert cross_entropy(student, torch.full_like(labels, IGNORE_INDEX)).item() == 0.0


# ---------------------------------------------------------------- registry
def test_unknown_name_suggests_nearest():
    with pytest.raises(ValueError, match="forward_kl") as info:
        get_kd_loss("forwad_kl")
    assert isinstance(info.value, KeyError)
    assert "Did you mean 'forward_kl'" in str(info.value)
    assert "tvd" in str(info.value)


def test_user_registration(scratch_registry):
    @register_kd_loss("scaled_forward_kl")
    def scaled_forward_kl(student_logits, teacher_logits, labels, *, scale=2.0, **kw):
        return scale * forward_kl(student_logits, teacher_logits, labels, **kw)

    student, teacher, labels = make_inputs()
    assert get_kd_loss("scaled_forward_kl") is scaled_forward_kl
    torch.testing.assert_close(kd_loss("scaled_forward_kl", student, teacher, labels, scale=3.0),
                               3 * forward_kl(student, teacher, labels))
    with pytest.raises(ValueError, match="already registered"):
        register_kd_loss("forward_kl")(scaled_forward_kl)
    register_kd_loss("forward_kl", override=True)(scaled_forward_kl)
    assert get_kd_loss("forward_kl") is scaled_forward_kl


def test_shape_and_argument_errors():
    student, teacher, labels = make_inputs()
    with pytest.raises(ValueError, match="shape"):
        forward_kl(student, teacher[:, :3], labels)
    with pytest.raises(ValueError, match="temperature"):
        forward_kl(student, teacher, labels, temperature=0.0)
    with pytest.raises(ValueError, match="top_k"):
        forward_kl(student, teacher, labels, top_k=0)
