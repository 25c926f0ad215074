"""token_logprobs: equal to the naive full-logits computation (values and gradients), and its
gradient never materialises a [tokens, vocab] buffer (only [chunk, vocab])."""
import re

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from prorl_jax.loss import compute_loss, token_logprobs

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


def weighted_total(fn):
    """A scalar mixing logp and entropy with fixed weights, to check both gradients."""
    weights = jnp.asarray(np.random.default_rng(1).normal(size=(2, BATCH, TIME)), jnp.float32)

    def total(hidden, head_weight, targets, temperature):
        logp, entropy = fn(hidden, head_weight, targets, temperature)
        return jnp.sum(weights[0] * logp + weights[1] * entropy)
    return total


def chunked(hidden, head_weight, targets, temperature=1.0):
    with jax.default_matmul_precision("highest"):
        return token_logprobs(hidden, head_weight, targets, temperature=temperature,
                              chunk_size=CHUNK)


chunked_jit = jax.jit(chunked)
GRAD_ARGS = (0, 1, 3)   # hidden, head_weight, temperature
chunked_grad = jax.jit(jax.grad(weighted_total(chunked), argnums=GRAD_ARGS))
naive_grad = jax.jit(jax.grad(weighted_total(naive_logprobs), argnums=GRAD_ARGS))


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
    """Gradients w.r.t. hidden, head_weight and temperature."""
    with jax.default_matmul_precision("highest"):
        got = chunked_grad(*inputs, 1.3)
        want = naive_grad(*inputs, 1.3)
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
        jaxpr = jax.make_jaxpr(jax.grad(weighted_total(fn), argnums=GRAD_ARGS))(*inputs, 1.3)
        largest = _largest_buffer(jaxpr.jaxpr)
        if fn is naive_logprobs:   # the inspection does see a full-logits buffer when one exists
            assert largest >= tokens * VOCAB
        else:
            assert largest <= max(CHUNK * VOCAB, WIDTH * VOCAB), largest
    compiled = chunked_grad.lower(*inputs, 1.3).compile().memory_analysis()
    if compiled is not None:   # XLA's own account of the temporaries, where the backend gives it
        assert compiled.temp_size_in_bytes < tokens * VOCAB * 4


def autodiff_map_logprobs(hidden, head_weight, targets, temperature=1.0):
    """Negative control: chunks through lax.map, but differentiated by plain autodiff (no
    written backward), which saves every chunk's softmax for the backward pass."""
    tokens = hidden.shape[0] * hidden.shape[1]
    pad = -tokens % CHUNK

    def one_chunk(xs):
        h, t = xs
        logsm = jax.nn.log_softmax(h @ head_weight / temperature, axis=-1)
        return (jnp.take_along_axis(logsm, t[:, None], -1)[:, 0],
                -jnp.sum(jnp.exp(logsm) * logsm, -1))
    chunks = (jnp.pad(hidden.reshape(tokens, WIDTH), ((0, pad), (0, 0))).reshape(-1, CHUNK, WIDTH),
              jnp.pad(targets.reshape(tokens), (0, pad)).reshape(-1, CHUNK))
    logp, entropy = jax.lax.map(one_chunk, chunks)
    return (logp.reshape(-1)[:tokens].reshape(targets.shape),
            entropy.reshape(-1)[:tokens].reshape(targets.shape))


def test_the_inspection_catches_stacked_chunk_logits(inputs):
    jaxpr = jax.make_jaxpr(jax.grad(weighted_total(autodiff_map_logprobs),
                                    argnums=GRAD_ARGS))(*inputs, 1.3)
    assert _largest_buffer(jaxpr.jaxpr) >= BATCH * TIME * VOCAB


def test_bf16_gradients_within_bf16_rounding(inputs):
    """bf16 hidden and head: gradients come back in bf16, within bf16 rounding of the f32
    gradients of the same (bf16-rounded) inputs; the head's is summed over 8 chunks in f32."""
    hidden, head_weight, targets = (x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x
                                    for x in inputs)
    def bf16_chunked(h, w, t, temperature):
        return token_logprobs(h, w, t, temperature=temperature, chunk_size=CHUNK)
    got = jax.jit(jax.grad(weighted_total(bf16_chunked), argnums=(0, 1)))(
        hidden, head_weight, targets, 1.3)
    with jax.default_matmul_precision("highest"):
        want = naive_grad(hidden.astype(jnp.float32), head_weight.astype(jnp.float32), targets, 1.3)
    for g, w in zip(got, want):
        assert g.dtype == jnp.bfloat16
        scale = float(jnp.abs(w).max())
        np.testing.assert_allclose(np.asarray(g, np.float32), w, rtol=2e-2, atol=2e-2 * scale)


def test_compute_loss_on_token_logprobs_end_to_end(inputs):
    """The train step's composition: chunked log-probs and entropy of a head -> ProRL loss ->
    gradient w.r.t. the head, equal to the same through full logits."""
    hidden, head_weight, targets = inputs
    rng = np.random.default_rng(2)
    old_logp = naive_logprobs(hidden, head_weight * 1.05, targets)[0]
    ref_logp = naive_logprobs(hidden, head_weight * 0.9, targets)[0]
    advantages = jnp.asarray(rng.normal(size=BATCH), jnp.float32)
    mask = jnp.asarray(rng.random((BATCH, TIME)) < 0.8, jnp.float32)

    def loss_through(fn):
        def loss(w):
            logp, entropy = fn(hidden, w, targets, 1.0)
            return compute_loss(logp, old_logp, ref_logp, advantages, mask, eps_low=0.2,
                                eps_high=0.4, beta=0.1, entropy=entropy, entropy_coef=0.01)[0]
        return jax.jit(jax.value_and_grad(loss))
    with jax.default_matmul_precision("highest"):
        got_loss, got_grad = loss_through(chunked)(head_weight)
        want_loss, want_grad = loss_through(naive_logprobs)(head_weight)
    assert float(got_loss) == pytest.approx(float(want_loss), rel=1e-5)
    assert float(jnp.abs(want_grad).max()) > 1e-3
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-4, atol=1e-6)


def test_batch_sharded_inputs_need_no_collectives_forward(inputs):
    """With the batch split over 8 devices, the forward runs without communication and the
    backward's only collective is the reduction of the head gradient."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    hidden, head_weight, targets = inputs
    hidden = jnp.concatenate([hidden, hidden * 0.5])           # batch 8: one row per device
    targets = jnp.concatenate([targets, targets[::-1]])
    hidden = jax.device_put(hidden, NamedSharding(mesh, P("data")))
    targets = jax.device_put(targets, NamedSharding(mesh, P("data")))

    def forward(h, w, t):
        return token_logprobs(h, w, t, chunk_size=2 * CHUNK)

    def collectives(fn):
        text = fn.lower(hidden, head_weight, targets).compile().as_text()
        return re.findall(r"\b(all-gather|all-reduce|all-to-all|collective-permute|"
                          r"reduce-scatter)(?:-start)?\(", text)
    forward_jit = jax.jit(forward)
    assert collectives(forward_jit) == []
    grad_jit = jax.jit(jax.grad(lambda *a: jnp.sum(forward(*a)[0]), argnums=(0, 1)))
    assert set(collectives(grad_jit)) <= {"all-reduce"}
    got = forward_jit(hidden, head_weight, targets)
    want = numpy_logprobs(hidden, head_weight, targets)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


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
