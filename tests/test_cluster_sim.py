"""Cluster simulator: hand-timed tiny runs, workload statistics, determinism, policy ordering."""

import dataclasses

import numpy as np
import pytest

from lsw_jax.cluster.simulator import (
    ClusterConfig,
    MigrationPolicy,
    StepCostTable,
    generate_workload,
    home_replicas,
    simulate,
)

TABLE = StepCostTable(
    batch_sizes=(1, 2, 4), merged_s=(0.01, 0.012, 0.016), unmerged_s=(0.02, 0.024, 0.032)
)
TINY = ClusterConfig(
    num_replicas=1, num_adapters=2, replica_slots=3, max_batch=4, duration=10.0, warmup=0.0,
    step_costs=TABLE,
)  # fmt: skip
SMALL = ClusterConfig(
    num_replicas=16, num_adapters=160, replica_slots=16, duration=30.0, warmup=2.0, load=0.6
)


def workload(arrivals, adapters, tokens):
    return np.array(arrivals, float), np.array(adapters), np.array(tokens)


def test_step_cost_table_interpolates_and_loads():
    assert TABLE.step_time(3, merged=True) == pytest.approx(0.014)
    assert TABLE.step_time(64, merged=False) == pytest.approx(0.032)  # clamped
    loaded = StepCostTable.from_dict(
        {"batch_sizes": [1, 8], "merged_s": [0.01, 0.02], "unmerged_s": [0.02, 0.03]}
    )
    assert loaded.measured and loaded.step_time(8, merged=False) == pytest.approx(0.03)
    with pytest.raises(ValueError, match="merged_s"):
        StepCostTable(batch_sizes=(1, 2), merged_s=(0.1,), unmerged_s=(0.1, 0.2))


@pytest.mark.parametrize(
    "adapters, tokens, latencies",
    [
        ([0], [10], [10 * 0.01]),  # alone: merged steps
        ([0, 0], [10, 5], [5 * 0.012 + 5 * 0.01, 5 * 0.012]),  # one adapter: merged
        # two adapters: unmerged batch 2 for 5 steps, then merged batch 1 for 5 more
        ([0, 1], [10, 5], [5 * 0.024 + 5 * 0.01, 5 * 0.024]),
    ],
)
def test_hand_timed_batches(adapters, tokens, latencies):
    n = len(adapters)
    wl = workload([0.0] * n, adapters, tokens)
    result = simulate(TINY, MigrationPolicy(name="none"), wl)
    assert result.completed == n and result.unfinished == 0
    assert result.p50 == pytest.approx(np.percentile(latencies, 50))
    assert result.mean == pytest.approx(np.mean(latencies))


def test_late_arrival_joins_at_the_next_step_boundary():
    # request 0 runs alone (merged, 0.01 s/step); request 1 arrives mid-step at 0.015 s and
    # joins at the boundary 0.02 s; both then need 2 unmerged batch-2 steps (0.024 s each)
    wl = workload([0.0, 0.015], [0, 1], [4, 2])
    result = simulate(TINY, MigrationPolicy(name="none"), wl)
    first = 0.02 + 2 * 0.024
    second = first - 0.015
    assert result.mean == pytest.approx((first + second) / 2)


def test_unfinished_requests_count_with_their_age():
    cfg = dataclasses.replace(TINY, duration=0.9, max_batch=1)
    wl = workload([0.0, 0.0], [0, 0], [50, 50])  # each needs 0.5 s; the second cannot finish
    result = simulate(cfg, MigrationPolicy(name="none"), wl)
    assert result.completed == 1 and result.unfinished == 1
    assert result.mean == pytest.approx((0.5 + 0.9) / 2)


def test_workload_is_zipf_and_deterministic():
    cfg = dataclasses.replace(
        SMALL, num_adapters=50, drift_fraction=0.0, burst_rate=0.0, duration=200.0
    )
    arrival, adapter, tokens = generate_workload(cfg)
    again = generate_workload(cfg)
    for x, y in zip((arrival, adapter, tokens), again, strict=True):
        np.testing.assert_array_equal(x, y)
    assert np.all(np.diff(arrival) >= 0)
    assert arrival.size == pytest.approx(cfg.rate() * cfg.duration, rel=0.05)
    assert tokens.mean() == pytest.approx(cfg.mean_output_tokens, rel=0.05)
    counts = np.sort(np.bincount(adapter, minlength=50))[::-1]
    harmonic = (1.0 / np.arange(1, 51)).sum()
    assert counts[0] / counts.sum() == pytest.approx(1 / harmonic, rel=0.1)
    assert counts[1] / counts.sum() == pytest.approx(0.5 / harmonic, rel=0.15)


def test_home_assignment_covers_every_replica():
    for how in ("hash", "round_robin"):
        home = home_replicas(100, 10, how)
        assert home.min() == 0 and home.max() == 9
        assert np.bincount(home, minlength=10).max() <= 20


def test_simulation_is_deterministic_by_seed():
    policy = MigrationPolicy(name="greedy")
    a = simulate(SMALL, policy).to_dict()
    b = simulate(SMALL, policy).to_dict()
    for key in ("wall_s", "planner_s"):
        a.pop(key), b.pop(key)
    assert a == b


def test_co_migration_cuts_p99_under_skew():
    wl = generate_workload(SMALL)
    static = simulate(SMALL, MigrationPolicy(name="none"), wl)
    greedy = simulate(SMALL, MigrationPolicy(name="greedy"), wl)
    print(f"p99 none {static.p99:.2f} s, greedy {greedy.p99:.2f} s")
    assert greedy.requests_moved > 0 and greedy.adapter_loads > 0
    assert greedy.p99 < 0.8 * static.p99
    assert greedy.completed >= static.completed


def test_exact_policy_on_a_small_cluster():
    cfg = dataclasses.replace(SMALL, num_replicas=4, num_adapters=16, duration=10.0)
    wl = generate_workload(cfg)
    static = simulate(cfg, MigrationPolicy(name="none"), wl)
    exact = simulate(cfg, MigrationPolicy(name="exact", exact_time_limit=2.0), wl)
    greedy = simulate(cfg, MigrationPolicy(name="greedy"), wl)
    print(f"p99 none {static.p99:.2f}, exact {exact.p99:.2f}, greedy {greedy.p99:.2f}")
    assert exact.plans == greedy.plans == 10
    assert exact.p99 < static.p99 and greedy.p99 < static.p99


@pytest.mark.parametrize(
    "field, change",
    [
        ("replica_slots", {"num_adapters": 100, "num_replicas": 2, "replica_slots": 10}),
        ("num_replicas", {"num_replicas": 0}),
        ("duration", {"duration": 0.0}),
    ],
)
def test_invalid_config_names_the_field(field, change):
    with pytest.raises(ValueError, match=field):
        ClusterConfig(**change)
    with pytest.raises(ValueError, match="name"):
        MigrationPolicy(name="random")
