"""chunked_kd_loss must equal the unchunked CE + KD in value and student gradients."""

from __future__ import annotations

import pytest
import torch

from distill.losses import (
    IGNORE_INDEX,
    KD_LOSSES,
    chunked_kd_loss,
    count_valid,
    cross_entropy,
    forward_kl,
    get_kd_loss,
    register_kd_loss,
)

N, H_S, H_T, V = 13, 8, 6, 17


def make(n=N, v_s=V, v_t=V, dtype=torch.float64, ignore="some", seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(n, H_S, generator=g).to(dtype).requires_grad_()
    w_s = (torch.randn(v_s, H_S, generator=g) / 2).to(dtype).requires_grad_()
    h_t = torch.randn(n, H_T, generator=g).to(dtype)
    w_t = (torch.randn(v_t, H_T, generator=g) / 2).to(dtype)
    labels = torch.randint(0, min(v_s, v_t), (n,), generator=g)
    if ignore == "some":
        labels[[0, 4, 5, 11]] = IGNORE_INDEX
    elif ignore == "first_chunk":  # with chunk_size 5, chunk [0, 5) has no valid token
        labels[:5] = IGNORE_INDEX
        labels[9] = IGNORE_INDEX
    elif ignore == "all":
        labels[:] = IGNORE_INDEX
    extra = {}
    if bias:
        extra["student_bias"] = (torch.randn(v_s, generator=g) / 2).to(dtype).requires_grad_()
        extra["teacher_bias"] = (torch.randn(v_t, generator=g) / 2).to(dtype)
    return h_s, w_s, h_t, w_t, labels, extra


def unchunked(h_s, w_s, h_t, w_t, labels, *, loss="forward_kl", alpha_ce=0.0, num_valid_tokens=None,
              loss_kwargs=None, student_bias=None, teacher_bias=None, **kw):
    s_logits = torch.nn.functional.linear(h_s, w_s, student_bias)
    t_logits = torch.nn.functional.linear(h_t, w_t, teacher_bias)
    ce = cross_entropy(s_logits, labels, num_valid_tokens=num_valid_tokens)
    kd = get_kd_loss(loss)(s_logits, t_logits, labels, num_valid_tokens=num_valid_tokens, **(loss_kwargs or {}), **kw)
    return alpha_ce * ce + (1 - alpha_ce) * kd, ce, kd


def grads(total, *tensors):
    return torch.autograd.grad(total, [t for t in tensors if t is not None])


def assert_same(args, extra, *, rtol=1e-7, atol=1e-10, **kw):
    h_s, w_s, h_t, w_t, labels = args
    total, parts = chunked_kd_loss(h_s, w_s, h_t, w_t, labels, **extra, **kw)
    kw.pop("chunk_size", None)
    want, ce, kd = unchunked(h_s, w_s, h_t, w_t, labels, **extra, **kw)
    torch.testing.assert_close(total, want, rtol=rtol, atol=atol)
    torch.testing.assert_close(parts["ce"], ce.detach(), rtol=rtol, atol=atol)
    torch.testing.assert_close(parts["kd"], kd.detach(), rtol=rtol, atol=atol)
    assert not parts["ce"].requires_grad and not parts["kd"].requires_grad
    bias = extra.get("student_bias")
    for got_g, want_g in zip(grads(total, h_s, w_s, bias), grads(want, h_s, w_s, bias)):
        torch.testing.assert_close(got_g, want_g, rtol=rtol, atol=atol)


@pytest.mark.parametrize("alpha_ce", [0.0, 0.5])
@pytest.mark.parametrize("ignore", ["none", "some", "first_chunk"])
@pytest.mark.parametrize("chunk_size", [1, 5, 13, 64])
@pytest.mark.parametrize("loss", list(KD_LOSSES))
def test_matches_unchunked(loss, chunk_size, ignore, alpha_ce):
    *args, extra = make(ignore=ignore)
    assert_same(args, extra, loss=loss, chunk_size=chunk_size, alpha_ce=alpha_ce)


@pytest.mark.parametrize("loss", list(KD_LOSSES))
@pytest.mark.parametrize(("v_s", "v_t"), [(V + 3, V), (V, V + 4)])
def test_vocab_padding_mismatch_and_bias(loss, v_s, v_t):
    *args, extra = make(v_s=v_s, v_t=v_t, bias=True)
    assert_same(args, extra, loss=loss, chunk_size=4, alpha_ce=0.5)


@pytest.mark.parametrize("loss", list(KD_LOSSES))
def test_temperature_top_k_and_loss_kwargs_pass_through(loss):
    *args, extra = make(seed=3)
    own = {"generalized_jsd": {"beta": 0.3}, "skew_forward_kl": {"alpha": 0.4},
           "skew_reverse_kl": {"alpha": 0.4}}.get(loss, {})
    assert_same(args, extra, loss=loss, chunk_size=6, temperature=1.7, top_k=5, loss_kwargs=own)


@pytest.mark.parametrize("loss", list(KD_LOSSES))
def test_gradient_accumulation_with_global_count(loss):
    """Two micro-batches with the global denominator == one batch holding both."""
    h_s, w_s, h_t, w_t, labels, _ = make(n=20, seed=5)
    labels[12:17] = IGNORE_INDEX
    total_valid = count_valid(labels)

    full, _ = chunked_kd_loss(h_s, w_s, h_t, w_t, labels, loss=loss, alpha_ce=0.5, chunk_size=4)
    want = grads(full, h_s, w_s)

    parts, acc = [], None
    for sl in (slice(0, 9), slice(9, 20)):  # unequal halves, different valid counts
        loss_mb, _ = chunked_kd_loss(h_s[sl], w_s, h_t[sl], w_t, labels[sl], loss=loss, alpha_ce=0.5,
                                     chunk_size=4, num_valid_tokens=total_valid)
        parts.append(loss_mb)
        g = grads(loss_mb, h_s, w_s)
        acc = g if acc is None else tuple(a + b for a, b in zip(acc, g))
    torch.testing.assert_close(sum(parts), full)
    for a, b in zip(acc, want):
        torch.testing.assert_close(a, b)


def test_all_ignored_gives_zero_loss_and_grad():
    h_s, w_s, h_t, w_t, labels, _ = make(ignore="all")
    total, parts = chunked_kd_loss(h_s, w_s, h_t, w_t, labels, alpha_ce=0.5, chunk_size=4)
    assert total.item() == 0.0 and parts["ce"].item() == 0.0
    for g in grads(total, h_s, w_s):
        assert torch.count_nonzero(g) == 0


def test_batched_inputs_and_grad_output_scaling():
    h_s, w_s, h_t, w_t, labels, _ = make(n=12)
    h3 = h_s.detach().reshape(3, 4, H_S).requires_grad_()
    total, _ = chunked_kd_loss(h3, w_s, h_t.reshape(3, 4, H_T), w_t, labels.reshape(3, 4), chunk_size=5)
    want, _, _ = unchunked(h3.reshape(-1, H_S), w_s, h_t, w_t, labels)
    torch.testing.assert_close(total, want)
    g_got = torch.autograd.grad(3.5 * total, (h3, w_s))
    g_want = torch.autograd.grad(3.5 * want, (h3, w_s))
    assert g_got[0].shape == h3.shape
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)


def test_float32_matches_float64_reference():
    h_s, w_s, h_t, w_t, labels, _ = make(dtype=torch.float64)
    f32 = [t.detach().float().requires_grad_(t.requires_grad) for t in (h_s, w_s, h_t, w_t)]
    total, _ = chunked_kd_loss(*f32, labels, loss="generalized_jsd", alpha_ce=0.5, chunk_size=4)
    want, _, _ = unchunked(h_s, w_s, h_t, w_t, labels, loss="generalized_jsd", alpha_ce=0.5)
    torch.testing.assert_close(total.double(), want, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads(total, f32[0], f32[1]), grads(want, h_s, w_s)):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)


def test_bf16_inputs_close_to_fp32():
    h_s, w_s, h_t, w_t, labels, _ = make(n=40, dtype=torch.float32)
    bf = [t.detach().bfloat16().requires_grad_(t.requires_grad) for t in (h_s, w_s, h_t, w_t)]
    total, _ = chunked_kd_loss(*bf, labels, alpha_ce=0.5, chunk_size=16)
    assert total.dtype == torch.float32
    g_h, g_w = grads(total, bf[0], bf[1])
    assert g_h.dtype == g_w.dtype == torch.bfloat16
    want, _, _ = unchunked(*[t.detach().float().requires_grad_(t.requires_grad) for t in bf], labels, alpha_ce=0.5)
    torch.testing.assert_close(total, want, rtol=2e-2, atol=1e-3)
    assert torch.isfinite(g_h.float()).all() and torch.isfinite(g_w.float()).all()


def test_no_grad_mode_returns_value_only():
    h_s, w_s, h_t, w_t, labels, _ = make()
    with torch.no_grad():
        total, parts = chunked_kd_loss(h_s, w_s, h_t, w_t, labels, alpha_ce=0.5, chunk_size=4)
    want, _, _ = unchunked(h_s, w_s, h_t, w_t, labels, alpha_ce=0.5)
    assert not total.requires_grad
    torch.testing.assert_close(total, want.detach())


def test_user_registered_loss_works_chunked():
    @register_kd_loss("_test_half_forward_kl")
    def half_fkl(student_logits, teacher_logits, labels, **kw):
        return 0.5 * forward_kl(student_logits, teacher_logits, labels, **kw)

    try:
        *args, extra = make()
        assert_same(args, extra, loss="_test_half_forward_kl", chunk_size=4, alpha_ce=0.5)
    finally:
        KD_LOSSES.pop("_test_half_forward_kl")


def test_argument_errors():
    h_s, w_s, h_t, w_t, labels, _ = make()
    with pytest.raises(ValueError, match="Did you mean"):
        chunked_kd_loss(h_s, w_s, h_t, w_t, labels, loss="forward_k")
    with pytest.raises(ValueError, match="alpha_ce"):
        chunked_kd_loss(h_s, w_s, h_t, w_t, labels, alpha_ce=1.5)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_kd_loss(h_s, w_s, h_t, w_t, labels, chunk_size=0)
    with pytest.raises(ValueError, match="token count"):
        chunked_kd_loss(h_s, w_s, h_t[:-1], w_t, labels)


# --- the hand-written forward_kl path, its row steps and the fp32 weight-gradient blocks ---


@pytest.fixture
def small_steps(monkeypatch):
    """Several loss steps per chunk and several accumulator row blocks, even at test sizes."""
    from distill.losses import chunked

    monkeypatch.setattr(chunked, "SUB_ELEMS", 3 * V)  # 3 rows per step
    monkeypatch.setattr(chunked, "ACC_BLOCK_ELEMS", 5 * H_S)  # 5 vocab rows per block
    return chunked


@pytest.mark.parametrize("alpha_ce", [0.0, 0.3, 1.0])
@pytest.mark.parametrize(("v_s", "v_t"), [(V, V), (V + 3, V), (V, V + 4)])
@pytest.mark.parametrize(("temperature", "top_k"), [(1.0, None), (1.7, None), (1.0, 5), (0.6, 3)])
def test_forward_kl_fast_path_matches_unchunked(small_steps, alpha_ce, v_s, v_t, temperature, top_k):
    *args, extra = make(v_s=v_s, v_t=v_t, bias=True, seed=7)
    assert_same(args, extra, loss="forward_kl", chunk_size=5, alpha_ce=alpha_ce,
                temperature=temperature, top_k=top_k)


@pytest.mark.parametrize("alpha_ce", [0.0, 0.5])
def test_forward_kl_fast_path_equals_autograd_path(small_steps, alpha_ce):
    """A wrapper of forward_kl is not recognised, so it takes the generic autograd path."""

    @register_kd_loss("_test_wrapped_forward_kl")
    def wrapped(student_logits, teacher_logits, labels, **kw):
        return forward_kl(student_logits, teacher_logits, labels, **kw)

    try:
        h_s, w_s, h_t, w_t, labels, _ = make(n=20, seed=11)
        outs = []
        for name in ("forward_kl", "_test_wrapped_forward_kl"):
            total, parts = chunked_kd_loss(h_s, w_s, h_t, w_t, labels, loss=name, alpha_ce=alpha_ce,
                                           chunk_size=6, temperature=1.3, top_k=7)
            outs.append((total.detach(), parts["ce"], parts["kd"], *grads(total, h_s, w_s)))
        for a, b in zip(*outs):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    finally:
        KD_LOSSES.pop("_test_wrapped_forward_kl")


def test_forward_kl_fast_path_argument_errors():
    h_s, w_s, h_t, w_t, labels, _ = make()
    with pytest.raises(ValueError, match="temperature"):
        chunked_kd_loss(h_s, w_s, h_t, w_t, labels, temperature=0.0)
    with pytest.raises(ValueError, match="top_k"):
        chunked_kd_loss(h_s, w_s, h_t, w_t, labels, top_k=0)


@pytest.mark.parametrize("loss", ["forward_kl", "generalized_jsd"])
def test_bf16_multi_chunk_weight_grad_accumulates_in_fp32(small_steps, loss):
    """bf16 weights, 1024 chunks of one token: the weight gradient is as close to the fp32 computation as about
    one bf16 rounding of its largest entry: 1.2e-3 to 3.2e-3 of it over seeds 0-9, where a sum in bf16, chunk after
    chunk, is off by 2e-2 to 1e-1."""
    h_s, w_s, h_t, w_t, labels, _ = make(n=1024, dtype=torch.float32, seed=2)
    bf = [t.detach().bfloat16().requires_grad_(t.requires_grad) for t in (h_s, w_s, h_t, w_t)]
    total, _ = chunked_kd_loss(*bf, labels, loss=loss, alpha_ce=0.5, chunk_size=1)
    g_h, g_w = grads(total, bf[0], bf[1])
    assert g_h.dtype == g_w.dtype == torch.bfloat16
    # Reference: the same bf16-rounded logits, everything after them in fp32.
    ref = [t.detach().float().requires_grad_(t.requires_grad) for t in bf]
    s_logits = (ref[0] @ ref[1].t()).bfloat16().float()
    t_logits = (ref[2] @ ref[3].t()).bfloat16().float()
    want = 0.5 * cross_entropy(s_logits, labels) + 0.5 * get_kd_loss(loss)(s_logits, t_logits, labels)
    w_h, w_w = grads(want, ref[0], ref[1])
    torch.testing.assert_close(total, want, rtol=1e-5, atol=1e-6)
    assert (g_w.float() - w_w).abs().max() <= 2**-7 * w_w.abs().max()  # bf16 keeps 8 bits: 2^-9 per rounding
    torch.testing.assert_close(g_h.float(), w_h, rtol=2e-2, atol=1e-4)


def test_single_chunk_and_empty_input(small_steps):
    *args, extra = make()
    assert_same(args, extra, chunk_size=64, alpha_ce=0.5)
    h_s, w_s, h_t, w_t, labels, _ = make()
    total, parts = chunked_kd_loss(h_s[:0], w_s, h_t[:0], w_t, labels[:0], alpha_ce=0.5)
    assert total.item() == 0.0
    g_h, g_w = grads(total, h_s, w_s)
    assert torch.count_nonzero(g_h) == 0 and torch.count_nonzero(g_w) == 0
