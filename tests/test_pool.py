"""The model pool of KRR-ST (``ssdd.methods.kernel_ridge.pool.ModelPool``): online-step counters and re-initialisation
(the ageing rules: ssdd's reset, the released code's warm start and never-reset counters, a fresh network every step),
online training, seeding, and exact state round trips."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from ssdd.errors import ConfigError
from ssdd.methods.kernel_ridge.pool import ModelPool, PoolSettings

CPU = torch.device("cpu")
SHAPE = (1, 8, 8)
OUTPUTS = 4


def settings(**overrides: object) -> PoolSettings:
    base = {"size": 2, "arch": "convnet", "arch_args": {"widths": [2], "norm": "batch"}, "online_iterations": 3}
    return PoolSettings(**{**base, **overrides})


def make_pool(seed: int = 0, **overrides: object) -> ModelPool:
    return ModelPool(settings(**overrides), OUTPUTS, SHAPE, seed, CPU)


def batch(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE, generator=gen), torch.randn(n, OUTPUTS, generator=gen)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def params_differ(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Whether every learnable conv/linear weight differs (fresh random draws, not just a moved BN statistic)."""
    keys = [k for k in a if k.endswith("weight") and a[k].dim() > 1]
    assert keys
    return all(not torch.equal(a[k], b[k]) for k in keys)


# ---- counters and re-initialisation -----------------------------------------------------------------------


def test_member_is_reinitialised_after_online_iterations_and_its_counter_reset() -> None:
    pool = make_pool()
    images, targets = batch()
    initial = [weights(m) for m in pool.models]
    other = weights(pool.models[1])
    for i in range(3):
        assert pool.reinitialise_if_due(0) is False  # counter 0, 1, 2 < 3
        pool.train_online(0, images, targets)
        assert pool.counters == [i + 1, 0]
    trained = weights(pool.models[0])
    assert params_differ(trained, initial[0])  # the online steps moved it
    assert pool.reinitialisations == 0

    assert pool.reinitialise_if_due(0) is True
    fresh = weights(pool.models[0])
    assert params_differ(fresh, trained) and params_differ(fresh, initial[0]) and params_differ(fresh, other)
    assert pool.counters == [0, 0]
    assert pool.reinitialisations == 1
    assert not pool.optimizers[0].state  # a fresh SGD state (no momentum buffers from the old member)
    assert pool.optimizers[0].param_groups[0]["params"][0] is next(pool.models[0].parameters())
    assert same(weights(pool.models[1]), other)  # the other member is untouched
    assert pool.reinitialise_if_due(0) is False  # the counter starts over
    assert same(weights(pool.models[0]), fresh)


def test_released_ageing_never_resets_the_counter() -> None:
    pool = make_pool(ageing="released")
    images, targets = batch()
    for _ in range(3):
        assert pool.reinitialise_if_due(0) is False
        pool.train_online(0, images, targets)
    seen = [weights(pool.models[0])]
    for n in range(1, 4):  # from now on every call re-initialises, with or without training in between
        assert pool.reinitialise_if_due(0) is True
        assert pool.counters[0] == 3 + (n - 1) // 2
        assert pool.reinitialisations == n
        now = weights(pool.models[0])
        assert all(params_differ(now, before) for before in seen)
        seen.append(now)
        if n == 2:
            pool.train_online(0, images, targets)
    assert pool.counters == [4, 0]
    assert pool.reinitialise_if_due(1) is False


def test_train_online_increments_the_counter_and_leaves_eval_mode() -> None:
    pool = make_pool()
    images, targets = batch()
    loss = pool.train_online(1, images, targets)
    assert isinstance(loss, float)
    assert not pool.models[1].training
    assert pool.counters == [0, 1]


def test_train_online_returns_the_training_mse_before_the_step() -> None:
    pool = make_pool()
    images, targets = batch()
    model = copy.deepcopy(pool.models[0]).train()
    expected = F.mse_loss(model(images), targets).item()
    assert pool.train_online(0, images, targets) == pytest.approx(expected, rel=1e-6)


def test_train_online_lowers_the_mse_on_a_fixed_batch() -> None:
    images, targets = batch(16, seed=3)
    pool = make_pool(online_iterations=1000)
    losses = [pool.train_online(0, images, targets) for _ in range(40)]
    assert losses[-1] < 0.5 * losses[0], losses
    assert sum(losses[-5:]) < sum(losses[:5])
    # control: with a zero learning rate (and so no weight decay step either) the training-mode loss on the same
    # batch stays exactly where it was; the decrease above is the optimisation's doing
    frozen = make_pool(online_iterations=1000, lr=0.0)
    still = [frozen.train_online(0, images, targets) for _ in range(5)]
    assert still == [still[0]] * 5
    assert still[0] == losses[0]  # same seed: the same starting member


# ---- seeding and state round trips ------------------------------------------------------------------------


def test_pool_initialisation_is_a_function_of_the_seed() -> None:
    rng_before = torch.get_rng_state()
    a, b, c = make_pool(seed=0), make_pool(seed=0), make_pool(seed=1)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is left alone
    for ma, mb in zip(a.models, b.models, strict=True):
        assert same(weights(ma), weights(mb))
    for ma, mc in zip(a.models, c.models, strict=True):
        assert params_differ(weights(ma), weights(mc))
    assert params_differ(weights(a.models[0]), weights(a.models[1]))  # members differ from each other
    # the global RNG does not influence the pool either
    torch.manual_seed(12345)
    d = make_pool(seed=0)
    assert all(same(weights(x), weights(y)) for x, y in zip(a.models, d.models, strict=True))


def test_state_dict_round_trip_reproduces_weights_counters_and_next_reinitialisation() -> None:
    images, targets = batch()
    pool = make_pool(seed=0)
    for _ in range(3):
        pool.train_online(0, images, targets)
    assert pool.reinitialise_if_due(0)
    pool.train_online(0, images, targets)
    for _ in range(3):
        pool.train_online(1, images, targets)
    state = copy.deepcopy(pool.state_dict())

    restored = make_pool(seed=7)  # a different seed: everything must come from the state
    restored.load_state_dict(state)
    assert restored.counters == pool.counters == [1, 3]
    assert restored.reinitialisations == pool.reinitialisations == 1
    for m1, m2 in zip(pool.models, restored.models, strict=True):
        assert same(weights(m1), weights(m2))

    # the next online step (momentum buffers restored) and the next re-initialisation (generator state restored)
    assert restored.train_online(0, images, targets) == pool.train_online(0, images, targets)
    assert same(weights(restored.models[0]), weights(pool.models[0]))
    assert restored.reinitialise_if_due(1) and pool.reinitialise_if_due(1)
    assert same(weights(restored.models[1]), weights(pool.models[1]))
    assert restored.counters == pool.counters and restored.reinitialisations == pool.reinitialisations == 2
    # and without the state, a pool of that other seed would have drawn another member
    other = make_pool(seed=7)
    for _ in range(3):
        other.train_online(1, images, targets)
    other.reinitialise_if_due(1)
    assert params_differ(weights(other.models[1]), weights(pool.models[1]))


def test_released_ageing_warm_starts_each_member_a_random_number_of_steps_once() -> None:
    pool = make_pool(ageing="released", online_iterations=6)
    initial = [weights(m) for m in pool.models]
    images, targets = batch()
    assert not pool.warmed
    taken = pool.warm_start(images, targets)
    assert pool.warmed and taken == sum(pool.counters)
    assert all(1 <= c <= 6 for c in pool.counters)
    assert all(params_differ(weights(m), before) for m, before in zip(pool.models, initial))
    assert pool.warm_start(images, targets) == 0  # once only
    restored = make_pool(ageing="released", online_iterations=6)
    restored.load_state_dict(pool.state_dict())
    assert restored.warmed and restored.counters == pool.counters


def test_fresh_ageing_gives_a_new_untrained_network_every_time() -> None:
    pool = make_pool(ageing="fresh")
    assert not pool.trains_online and pool.warmed
    seen = [weights(pool.models[0])]
    for _n in range(1, 4):
        assert pool.reinitialise_if_due(0) is True
        assert all(params_differ(weights(pool.models[0]), before) for before in seen)
        seen.append(weights(pool.models[0]))
    assert pool.reinitialisations == 3 and pool.counters == [0, 0]


def test_the_online_step_weight_decays_every_parameter_unless_told_otherwise() -> None:
    images, targets = batch()
    for decay_1d in (True, False):
        pool, reference = make_pool(decay_1d=decay_1d, weight_decay=0.5), make_pool(decay_1d=decay_1d, weight_decay=0.0)
        before = weights(pool.models[0])
        pool.train_online(0, images, targets)
        reference.train_online(0, images, targets)
        for name, p in pool.models[0].named_parameters():
            undecayed = dict(reference.models[0].named_parameters())[name]
            decayed = p.ndim > 1 or decay_1d
            expected = undecayed - (pool.settings.lr * 0.5 * before[name] if decayed else 0)
            torch.testing.assert_close(p.detach(), expected.detach(), rtol=1e-5, atol=1e-6)


def test_an_unknown_ageing_rule_is_refused_with_the_choices() -> None:
    with pytest.raises(ConfigError) as info:
        settings(ageing="sometimes")
    assert str(info.value) == "pool.ageing must be one of reset, released, fresh, got 'sometimes'"
