"""token_logprobs: equal to the naive full-logits computation (values and gradients), and its
gradient never materialises a [tokens, vocab] buffer (only [chunk, vocab])."""
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from prorl_jax.loss import token_logprobs

BATCH, TIME, WIDTH, VOCAB, CHUNK = 4, 30, 16, 512, 16   # 120 tokens: not a multiple of CHUNK
HIGHEST = jax.lax.Precision.HIGHEST


def naive_logprobs(hidden, head_weight, targets, temperature=1.0):
    """Full [batch, time, vocab] logits, f32 log-softmax."""
    logits = jnp.einsum("bth,hv->btv", hidden.astype(jnp.float32),
                        head_weight.astype(jnp.float32), precision=HIGHEST) / temperature
    logsm = jax.nn.log_softmax(logits, axis=-1)
    logp = jnp.take_along_axis(logsm, targets[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logsm) * logsm, axis=-1)
    return logp, entropy


def numpy_logprobs(hidden, head_weight, targets, temperature=1.0):
    logits = np.asarray(hidden, np.float64) @ np.asarray(head_weight, np.float64) / temperature
    logits -= logits.max(-1, keepdims=True)
    logsm = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    logp = np.take_along_axis(logsm, np.asarray(targets)[..., None], -1)[..., 0]
    return logp, -(np.exp(logsm) * logsm).sum(-1)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    hidden = rng.normal(0, 1, (BATCH, TIME, WIDTH)).astype(np.float32)
    head_weight = rng.normal(0, 0.5, (WIDTH, VOCAB)).astype(np.float32)
    targets = rng.integers(0, VOCAB, (BATCH, TIME)).astype(np.int32)
    return jnp.asarray(hidden), jnp.asarray(head_weight), jnp.asarray(targets)


def weighted_total(fn, temperature):
    """A scalar mixing logp and entropy with fixed weights, to check both gradients."""
    weights = jnp.asarray(np.random.default_rng(1).normal(size=(2, BATCH, TIME)), jnp.float32)

    def total(hidden, head_weight, targets):
        logp, entropy = fn(hidden, head_weight, targets, temperature)
        return jnp.sum(weights[0] * logp + weights[1] * entropy)
    return total


def chunked(hidden, head_weight, targets, temperature=1.0):
    with jax.default_matmul_precision("highest"):
        return token_logprobs(hidden, head_weight, targets, temperature=temperature,
                              chunk_size=CHUNK)


chunked_jit = jax.jit(chunked)
chunked_grad = jax.jit(jax.grad(weighted_total(chunked, 1.3), argnums=(0, 1)))
naive_grad = jax.jit(jax.grad(weighted_total(naive_logprobs, 1.3), argnums=(0, 1)))


@pytest.mark.parametrize("temperature", [1.0, 1.3])
def test_matches_naive_full_logits(inputs, temperature):
    logp, entropy = chunked_jit(*inputs, temperature)
    assert logp.dtype == jnp.float32 and entropy.dtype == jnp.float32
    assert logp.shape == entropy.shape == (BATCH, TIME)
    want_logp, want_entropy = naive_logprobs(*inputs, temperature)
    np.testing.assert_allclose(logp, want_logp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(entropy, want_entropy, rtol=1e-5, atol=1e-5)
    ref_logp, ref_entropy = numpy_logprobs(*inputs, temperature)
    np.testing.assert_allclose(logp, ref_logp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(entropy, ref_entropy, rtol=1e-5, atol=1e-5)


def test_gradients_match_naive_full_logits(inputs):
    with jax.default_matmul_precision("highest"):
        got = chunked_grad(*inputs)
        want = naive_grad(*inputs)
    for g, w in zip(got, want):
        assert np.abs(np.asarray(w)).max() > 1e-2
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_bf16_hidden_gives_f32_logprobs(inputs):
    hidden, head_weight, targets = inputs
    hidden_bf16, head_bf16 = hidden.astype(jnp.bfloat16), head_weight.astype(jnp.bfloat16)
    logp, entropy = jax.jit(lambda h, w, t: token_logprobs(h, w, t, chunk_size=CHUNK))(
        hidden_bf16, head_bf16, targets)
    assert logp.dtype == jnp.float32 and entropy.dtype == jnp.float32
    want_logp, want_entropy = numpy_logprobs(hidden_bf16.astype(jnp.float32),
                                             head_bf16.astype(jnp.float32), targets)
    np.testing.assert_allclose(logp, want_logp, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(entropy, want_entropy, rtol=1e-4, atol=1e-4)


def _largest_buffer(jaxpr) -> int:
    """Elements of the largest array any equation (including nested ones) produces."""
    largest = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            largest = max(largest, int(np.prod(getattr(var.aval, "shape", ()), dtype=np.int64)))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    largest = max(largest, _largest_buffer(sub.jaxpr))
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    largest = max(largest, _largest_buffer(sub))
    return largest


def test_gradient_never_holds_token_by_vocab_logits(inputs):
    tokens = BATCH * TIME
    assert tokens * VOCAB >= 7 * CHUNK * VOCAB   # the bound below is far from the full size
    for fn in (chunked, naive_logprobs):
        jaxpr = jax.make_jaxpr(jax.grad(weighted_total(fn, 1.0), argnums=(0, 1)))(*inputs)
        largest = _largest_buffer(jaxpr.jaxpr)
        if fn is naive_logprobs:   # the inspection does see a full-logits buffer when one exists
            assert largest >= tokens * VOCAB
        else:
            assert largest <= max(CHUNK * VOCAB, WIDTH * VOCAB), largest
    compiled = chunked_grad.lower(*inputs).compile().memory_analysis()
    if compiled is not None:   # XLA's own account of the temporaries, where the backend gives it
        assert compiled.temp_size_in_bytes < tokens * VOCAB * 4


def test_without_checkpoint_the_backward_pass_would_stack_chunk_logits(inputs, monkeypatch):
    """Negative control: with the jax.checkpoint removed, lax.map saves every chunk's logits
    for the backward pass, a [num_chunks, chunk, vocab] buffer the inspection catches."""
    import prorl_jax.loss.logprobs as logprobs_module
    monkeypatch.setattr(logprobs_module, "_chunk_logprobs",
                        logprobs_module._chunk_logprobs.__wrapped__)
    jaxpr = jax.make_jaxpr(jax.grad(weighted_total(chunked, 1.0), argnums=(0, 1)))(*inputs)
    assert _largest_buffer(jaxpr.jaxpr) >= BATCH * TIME * VOCAB


def test_bad_input_names_the_field(inputs):
    hidden, head_weight, targets = inputs
    with pytest.raises(ValueError, match="targets must be token ids"):
        token_logprobs(hidden, head_weight, targets.at[0, 0].set(VOCAB))
    with pytest.raises(ValueError, match="head_weight must be"):
        token_logprobs(hidden, head_weight.T, targets)
    with pytest.raises(ValueError, match="targets must be"):
        token_logprobs(hidden, head_weight, targets[:, 1:])
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs(hidden, head_weight, targets, chunk_size=0)
