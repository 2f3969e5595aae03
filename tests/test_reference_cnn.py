"""Reference CNN benchmark: FedAvg averaging, the augmentation, and a tiny end-to-end FedAvg run (synthetic data)."""

from __future__ import annotations

import torch

from simulations.benchmarks.reference_cnn import augment_batch, average_states, fedavg, new_model, predict


def test_reference_cnn_fedavg_and_augmentation() -> None:
    torch.set_num_threads(1)
    # FedAvg of identical site states is that state (size-weighted and unweighted); a weighted mean is exact
    state = new_model(1).state_dict()
    for weights in (None, [10.0, 30.0, 5.0]):
        avg = average_states([state, state, state], weights)
        assert set(avg) == set(state)
        for k in state:
            assert avg[k].dtype == state[k].dtype
            torch.testing.assert_close(avg[k], state[k], rtol=0, atol=1e-7)
    other = new_model(2).state_dict()
    mixed = average_states([state, other], [1.0, 3.0])
    key = next(iter(state))
    torch.testing.assert_close(mixed[key], 0.25 * state[key] + 0.75 * other[key])

    # augmentation: shape and [-1,1] range kept, seeded and deterministic, not the identity
    x = torch.rand(6, 1, 64, 64) * 2 - 1
    a = augment_batch(x, torch.Generator().manual_seed(0))
    b = augment_batch(x, torch.Generator().manual_seed(0))
    c = augment_batch(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert float(a.min()) >= -1.0 and float(a.max()) <= 1.0
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.allclose(a, x)

    # a tiny federation on two synthetic sites runs, is deterministic, and predicts only in-scope planes
    gen = torch.Generator().manual_seed(3)
    sites = [(torch.rand(8, 1, 64, 64, generator=gen) * 2 - 1, torch.randint(0, 4, (8,), generator=gen))
             for _ in range(2)]
    kw = dict(rounds=2, local_steps=2, batch_size=4, lr=2e-3, weighting="size", seed=5)
    m1, m2 = fedavg(sites, **kw), fedavg(sites, **kw)
    for k, v in m1.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k])
    pred = predict(m1, sites[0][0])
    assert pred.shape == (8,) and int(pred.max()) <= 3
