"""The KD losses against a sparse teacher equal the dense losses of distill/losses/kd.py on the same teacher logits:
with every token, with the teacher's top-k (renormalised), and, for the tail as one class, the dense loss on the
coarsened distributions; chunked equals unchunked."""
from __future__ import annotations

import pytest
import torch

from distill.losses import (IGNORE_INDEX, KD_LOSSES, SPARSE_KD_LOSSES, SparseTeacher, chunked_sparse_kd_loss,
                            cross_entropy, get_kd_loss, get_sparse_kd_loss)

N, V = 23, 19
CASES = [("forward_kl", {}), ("reverse_kl", {}), ("generalized_jsd", {"beta": 0.3}), ("generalized_jsd", {"beta": 0.0}),
         ("generalized_jsd", {"beta": 1.0}), ("skew_forward_kl", {"alpha": 0.2}), ("skew_reverse_kl", {"alpha": 0.2}),
         ("tvd", {})]


def logits(seed=0, n=N, v=V, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    t = scale * torch.randn(n, v, generator=g, dtype=torch.float64)
    s = (scale * torch.randn(n, v, generator=g, dtype=torch.float64)).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    labels[[1, 7, 8]] = IGNORE_INDEX
    return s, t, labels


def top_entries(t, k):
    """The teacher's k most likely tokens (most likely first), their log-probs, and the log of the rest's mass."""
    logp = t.log_softmax(-1)
    top = logp.topk(k, -1)
    rest = logp.scatter(-1, top.indices, float("-inf")).logsumexp(-1)
    return SparseTeacher(top.indices, top.values, rest)


def grad(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


def test_every_dense_loss_has_a_sparse_one():
    assert set(SPARSE_KD_LOSSES) == set(KD_LOSSES)


@pytest.mark.parametrize("name,kw", CASES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_every_token_equals_the_dense_loss(name, kw, temperature):
    s, t, labels = logits()
    want = get_kd_loss(name)(s, t, labels, temperature=temperature, **kw)
    got = get_sparse_kd_loss(name)(s, top_entries(t, V), labels, temperature=temperature, **kw)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad(got, s), grad(want, s), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name,kw", CASES)
@pytest.mark.parametrize("k,temperature", [(1, 1.0), (5, 1.0), (5, 0.7), (12, 2.0)])
def test_top_k_equals_the_dense_top_k_loss(name, kw, k, temperature):
    s, t, labels = logits(seed=1)
    want = get_kd_loss(name)(s, t, labels, temperature=temperature, top_k=k, **kw)
    got = get_sparse_kd_loss(name)(s, top_entries(t, k), labels, temperature=temperature, **kw)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad(got, s), grad(want, s), rtol=1e-9, atol=1e-12)
    # A smaller top_k taken from more entries: the first ones, the rest joins the tail.
    sub = get_sparse_kd_loss(name)(s, top_entries(t, k + 4), labels, temperature=temperature, top_k=k, **kw)
    torch.testing.assert_close(sub, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name,kw", CASES)
@pytest.mark.parametrize("k", [3, V])
def test_tail_bucket_is_the_dense_loss_of_the_coarsened_distributions(name, kw, k):
    """The entries + one class for the rest, on both sides: the dense loss on those k+1 log-probabilities."""
    s, t, labels = logits(seed=2)
    sparse = top_entries(t, k)
    logq = s.log_softmax(-1)
    q_in = logq.gather(-1, sparse.ids)
    q_out = torch.log1p(-q_in.exp().sum(-1).clamp(max=1 - 1e-15)) if k < V else torch.full((N,), float("-inf"),
                                                                                          dtype=s.dtype)
    coarse_s = torch.cat([q_in, q_out[:, None]], -1)
    coarse_t = torch.cat([sparse.logp, sparse.log_tail[:, None]], -1)
    want = get_kd_loss(name)(coarse_s, coarse_t, labels, **kw)
    got = get_sparse_kd_loss(name)(s, sparse, labels, tail="bucket", **kw)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad(got, s), grad(want, s), rtol=1e-7, atol=1e-10)
    if k == V:  # nothing outside: the dense loss on the whole vocabulary
        torch.testing.assert_close(got, get_kd_loss(name)(s, t, labels, **kw), rtol=1e-10, atol=1e-12)
        return
    # Entries dropped by top_k join the tail; stored values that do not sum to 1 (quantised) are normalised.
    more = top_entries(t, k + 3)
    torch.testing.assert_close(get_sparse_kd_loss(name)(s, more, labels, tail="bucket", top_k=k, **kw), got,
                               rtol=1e-9, atol=1e-12)
    off = SparseTeacher(sparse.ids, sparse.logp + 0.05, sparse.log_tail + 0.05)
    torch.testing.assert_close(get_sparse_kd_loss(name)(s, off, labels, tail="bucket", **kw), got, rtol=1e-9, atol=1e-12)


def test_bucket_is_a_lower_bound_of_the_full_forward_kl_and_closer_than_renormalising():
    s, t, labels = logits(seed=3, scale=1.0)
    full = get_kd_loss("forward_kl")(s, t, labels)
    bucket = get_sparse_kd_loss("forward_kl")(s, top_entries(t, 4), labels, tail="bucket")
    assert bucket <= full
    with pytest.raises(ValueError, match="temperature 1"):
        get_sparse_kd_loss("forward_kl")(s, top_entries(t, 4), labels, tail="bucket", temperature=2.0)


@pytest.mark.parametrize("name,kw", CASES)
def test_ignored_positions_may_hold_anything(name, kw):
    s, t, labels = logits(seed=4)
    sparse = top_entries(t, 6)
    junk = sparse.logp.clone()
    junk[labels == IGNORE_INDEX] = float("nan")
    ids = sparse.ids.clone()
    ids[labels == IGNORE_INDEX] = 0  # repeated ids too
    dirty = SparseTeacher(ids, junk, sparse.log_tail.masked_fill(labels == IGNORE_INDEX, float("nan")))
    got = get_sparse_kd_loss(name)(s, dirty, labels, **kw)
    want = get_sparse_kd_loss(name)(s, sparse, labels, **kw)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = grad(got, s)
    assert torch.isfinite(g).all() and (g[labels == IGNORE_INDEX] == 0).all()


def test_empty_slots_and_a_student_with_a_larger_head():
    """-inf slots count for nothing (a repeated id among them too); extra student logits beyond the entries' vocab
    are outside the teacher's classes, as the dense loss's shared-prefix cut would not count them."""
    s, t, labels = logits(seed=5)
    sparse = top_entries(t, 4)
    padded = SparseTeacher(torch.cat([sparse.ids, sparse.ids[:, :1]], -1),
                           torch.cat([sparse.logp, torch.full((N, 1), float("-inf"), dtype=t.dtype)], -1), sparse.log_tail)
    for name, kw in CASES:
        fn = get_sparse_kd_loss(name)
        torch.testing.assert_close(fn(s, padded, labels, **kw), fn(s, sparse, labels, **kw), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,kw", [("forward_kl", {}), ("generalized_jsd", {"beta": 0.4}), ("tvd", {})])
@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_chunked_equals_unchunked(name, kw, tail):
    g = torch.Generator().manual_seed(6)
    n, h, v = 17, 8, 13
    hidden = torch.randn(2, n, h, generator=g, dtype=torch.float64).requires_grad_()
    weight = torch.randn(v, h, generator=g, dtype=torch.float64).requires_grad_()
    t = 3 * torch.randn(2 * n, v, generator=g, dtype=torch.float64)
    labels = torch.randint(0, v, (2, n), generator=g)
    labels[0, :6] = IGNORE_INDEX
    sparse = top_entries(t, 5)
    teacher = SparseTeacher(sparse.ids.reshape(2, n, 5), sparse.logp.reshape(2, n, 5), sparse.log_tail.reshape(2, n))
    num = (labels != IGNORE_INDEX).sum() + 3  # a global count, as the trainer passes
    total, parts = chunked_sparse_kd_loss(hidden, weight, teacher, labels, loss=name, alpha_ce=0.3, chunk_size=5,
                                          num_valid_tokens=num, tail=tail, loss_kwargs=kw)
    s = hidden @ weight.T
    ce = cross_entropy(s, labels, num_valid_tokens=num)
    kd = get_sparse_kd_loss(name)(s, teacher, labels, num_valid_tokens=num, tail=tail, **kw)
    want = 0.3 * ce + 0.7 * kd
    torch.testing.assert_close(total, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(parts["kd"], kd, rtol=1e-10, atol=1e-12)
    for a, b in zip(torch.autograd.grad(total, [hidden, weight]), torch.autograd.grad(want, [hidden, weight])):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
