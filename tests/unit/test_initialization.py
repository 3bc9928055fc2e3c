import math

import pytest
import torch

from gora.initialization import b_from_c, draw_a, initial_delta, layer_seed, rslora_scaling, solve_c


def _projector(a):
    return a.t() @ torch.linalg.inv(a @ a.t()) @ a


def _init(g_bar, rank, gamma=0.05, alpha=16.0, name="layer"):
    out_features, in_features = g_bar.shape
    a = draw_a(0, name, rank, in_features)
    c = solve_c(g_bar @ a.t(), a @ a.t())
    b = b_from_c(c, gamma, in_features, alpha)
    return a, b


def test_a_is_kaiming_uniform_and_fixed_by_seed_and_name():
    a = draw_a(0, "x.q", 64, 256)
    bound = 1 / math.sqrt(256)
    assert a.abs().max() <= bound and a.abs().max() > 0.95 * bound
    assert a.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert torch.equal(a, draw_a(0, "x.q", 64, 256))
    assert not torch.equal(a, draw_a(1, "x.q", 64, 256))
    assert not torch.equal(a, draw_a(0, "x.k", 64, 256))
    assert torch.equal(draw_a(0, "x.q", 8, 256), a[:8])  # rank r uses the first r rows of A_max


def test_layer_seed_is_a_stable_hash():
    # pinned: the same on every machine and Python process (no hash randomisation)
    assert layer_seed(0, "model.layers.0.self_attn.q_proj") == layer_seed(0, "model.layers.0.self_attn.q_proj")
    assert 0 <= layer_seed(0, "a") < 2**63
    assert layer_seed(0, "a") != layer_seed(0, "b")
    # the SHA-256-based seeds themselves (first 8 bytes of sha256("gora:{seed}:{name}"), little-endian, 63 bits):
    # A is drawn from them, so a change of the hash would break the reproducibility of saved states
    assert layer_seed(0, "model.layers.0.self_attn.q_proj") == 2992808872821811075
    assert layer_seed(0, "a") == 7425148343420816953
    assert layer_seed(0, "b") == 3441148175641660459
    assert layer_seed(1, "a") == 5386750945968379429  # the run's seed enters the hash too


@pytest.mark.parametrize("alpha", [8.0, 16.0, 64.0])
def test_delta_is_minus_gamma_scaled_projected_gradient(alpha):
    g_bar = torch.randn(48, 96, generator=torch.Generator().manual_seed(1))
    gamma, rank = 0.05, 6
    a, b = _init(g_bar, rank, gamma, alpha)
    delta = initial_delta(a, b, alpha)
    projector = _projector(a.double()).float()
    expected = -gamma * math.sqrt(96 / rank) * g_bar @ projector
    torch.testing.assert_close(delta, expected, rtol=1e-4, atol=1e-6)  # alpha cancels
    torch.testing.assert_close(projector @ projector, projector, rtol=1e-4, atol=1e-5)


def test_delta_norm_is_about_gamma_times_gradient_norm():
    g_bar = torch.randn(256, 1024, generator=torch.Generator().manual_seed(2))
    gamma = 0.05
    a, b = _init(g_bar, 16, gamma)
    ratio = initial_delta(a, b, 16.0).norm() / (gamma * g_bar.norm())
    assert 0.9 <= ratio <= 1.1


def test_c_solves_least_squares_fit():
    g_bar = torch.randn(20, 50, generator=torch.Generator().manual_seed(3))
    a = draw_a(0, "n", 5, 50)
    c = solve_c(g_bar @ a.t(), a @ a.t())
    expected = torch.linalg.lstsq(a.t().double(), g_bar.t().double()).solution.t().float()
    torch.testing.assert_close(c, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rank", [1, 8, 32])
def test_c_is_the_float64_solution_rounded_once_to_fp32(rank):
    generator = torch.Generator().manual_seed(rank)
    projected = torch.randn(512, rank, generator=generator)
    a = draw_a(1, "layer", rank, 256)
    gram = a @ a.t()
    expected = torch.linalg.solve(gram.double(), projected.double().t()).t().float()  # G Cᵀ = Pᵀ
    torch.testing.assert_close(solve_c(projected, gram), expected, rtol=1.2e-7, atol=0)  # at most 1 ulp apart


def test_singular_gram_falls_back_to_least_squares():
    a = torch.ones(2, 4)  # rank-deficient: A Aᵀ singular
    c = solve_c(torch.randn(3, 2), a @ a.t())
    assert torch.isfinite(c).all()


def test_rslora_scaling():
    assert rslora_scaling(16, 4) == 8.0


def test_draws_on_the_pool_equal_serial_draws_and_threads_end_with_the_block():
    import threading

    from gora.initialization import draw_omega, draw_pool

    layers = [(f"layers.{i}.q", 16 + i) for i in range(12)]
    with draw_pool(len(layers)) as pool:
        futures = {n: (pool.submit(draw_a, 3, n, 8, d), pool.submit(draw_omega, 3, n, d, 4)) for n, d in layers}
    for name, in_features in layers:
        a, omega = (f.result() for f in futures[name])
        assert torch.equal(a, draw_a(3, name, 8, in_features))
        assert torch.equal(omega, draw_omega(3, name, in_features, 4))
    assert not [t for t in threading.enumerate() if t.name.startswith("gora-draw")]


@pytest.mark.parametrize("estimator", ["full", "sketch"])
def test_a_failing_estimation_leaves_no_draw_threads_and_the_state_holds_the_seeded_a(tiny_bert, estimator):
    import threading

    from peft import LoraConfig

    from gora import GoraConfig, estimate_gora

    from conftest import make_bert_batches

    lora = LoraConfig(r=4, target_modules=["query", "value"])
    config = GoraConfig(num_steps=2, estimator=estimator, importance="frobenius", show_progress=False)

    def failing(model, batch):
        raise RuntimeError("loss failed")

    with pytest.raises(RuntimeError, match="loss failed"):
        estimate_gora(tiny_bert, lora, make_bert_batches(2), config, loss_fn=failing)
    assert not [t for t in threading.enumerate() if t.name.startswith("gora-draw")]
    state = estimate_gora(tiny_bert, lora, make_bert_batches(2), config)
    for name, a in state.A.items():
        assert torch.equal(a, draw_a(0, name, 16, a.shape[1])[: a.shape[0]])  # r_max = 4 r, first r_i rows
