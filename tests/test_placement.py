"""Co-migration solvers: exact MILP vs brute force and hand-computed optima; greedy vs exact."""

import itertools
import time

import numpy as np
import pytest

from lsw_jax.cluster.placement import (
    PlacementProblem,
    check_plan,
    evaluate,
    keep_plan,
    solve_exact,
    solve_greedy,
)


def random_problem(rng, num_a, num_r, *, capacity=4.0, mean_queue=3.0, move_costs=(0.1, 0.5)):
    """Adapters of size 1-2 on replicas of ``capacity``, each held once, queues where held."""
    size = rng.integers(1, 3, num_a).astype(float)
    resident = np.zeros((num_a, num_r), dtype=bool)
    used = np.zeros(num_r)
    for a in rng.permutation(num_a):
        fits = np.flatnonzero(used + size[a] <= capacity)
        r = int(rng.choice(fits)) if fits.size else int(np.argmin(used))
        resident[a, r] = True
        used[r] += size[a]
    queued = np.where(resident, rng.poisson(mean_queue, (num_a, num_r)), 0)
    pinned = resident & (rng.random((num_a, num_r)) < 0.3)
    return PlacementProblem(
        capacity=np.full(num_r, max(capacity, used.max())),
        adapter_size=size,
        resident=resident,
        queued=queued,
        cost=rng.integers(1, 5, num_a).astype(float),
        base_load=rng.uniform(0, 5, num_r),
        pinned=pinned,
        request_move_cost=move_costs[0],
        adapter_move_cost=move_costs[1],
    )


def brute_force(problem):
    """Minimum objective over every request split and every placement (tiny instances)."""
    num_a, num_r = problem.queued.shape
    totals = problem.queued.sum(axis=1)

    def splits(n):
        return [c for c in itertools.product(range(n + 1), repeat=num_r) if sum(c) == n]

    best = np.inf
    for x_rows in itertools.product(*(splits(int(n)) for n in totals)):
        x = np.array(x_rows).reshape(num_a, num_r)
        for bits in itertools.product((False, True), repeat=num_a * num_r):
            y = np.array(bits).reshape(num_a, num_r)
            if np.any((x > 0) & ~y) or np.any(problem.pinned & ~y):
                continue
            if np.any(problem.adapter_size @ y > problem.capacity + 1e-9):
                continue
            best = min(best, evaluate(problem, x, y)[1])
    return best


def two_replica_case(adapter_move_cost=0.5, capacity_1=2.0, pin_other=False):
    """Replica 0 holds adapter 0 with 6 queued unit requests; replica 1 holds idle adapter 1."""
    return PlacementProblem(
        capacity=[2.0, capacity_1],
        adapter_size=[1.0, 1.0],
        resident=[[True, False], [False, True]],
        queued=[[6, 0], [0, 0]],
        cost=[1.0, 1.0],
        pinned=[[False, False], [False, pin_other]],
        request_move_cost=0.1,
        adapter_move_cost=adapter_move_cost,
        eviction_cost=0.01,
    )


@pytest.mark.parametrize(
    "kwargs, expected, moved",
    [
        # copy adapter 0 to replica 1 (0.5) and move 3 requests (0.3): makespan 3
        ({}, 3.0 + 0.5 + 0.3, 3),
        # a copy costs more than it saves: keep everything (makespan 6)
        ({"adapter_move_cost": 3.5}, 6.0, 0),
        # replica 1 has one slot: evict idle adapter 1 (0.01) to make room
        ({"capacity_1": 1.0}, 3.0 + 0.5 + 0.3 + 0.01, 3),
        # ... unless adapter 1 is pinned there: nothing can move
        ({"capacity_1": 1.0, "pin_other": True}, 6.0, 0),
    ],
)
@pytest.mark.parametrize("solver", [solve_exact, solve_greedy])
def test_hand_computed_cases(solver, kwargs, expected, moved):
    problem = two_replica_case(**kwargs)
    plan = solver(problem)
    check_plan(problem, plan)
    assert plan.objective == pytest.approx(expected)
    assert plan.num_requests_moved == moved
    if moved:
        assert [(c.adapter, c.dst, c.src) for c in plan.adapter_copies] == [(0, 1, 0)]
        assert plan.assignment.tolist() == [[3, 3], [0, 0]]


@pytest.mark.parametrize("seed", range(12))
def test_exact_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    problem = random_problem(rng, 2, 3, capacity=2.0, mean_queue=1.2)
    plan = solve_exact(problem)
    check_plan(problem, plan)
    assert plan.optimal
    assert plan.objective == pytest.approx(brute_force(problem), abs=1e-7)


def test_greedy_within_five_percent_of_exact():
    rng = np.random.default_rng(0)
    ratios = []
    for _ in range(40):
        problem = random_problem(rng, int(rng.integers(3, 8)), int(rng.integers(2, 5)))
        exact, greedy = solve_exact(problem), solve_greedy(problem)
        check_plan(problem, exact)
        check_plan(problem, greedy)
        assert exact.optimal
        assert greedy.objective >= exact.objective - 1e-7  # exact is a lower bound
        assert exact.objective <= keep_plan(problem).objective + 1e-7
        ratios.append(greedy.objective / exact.objective)
    ratios = np.array(ratios)
    print(f"greedy/exact objective: mean {ratios.mean():.4f}, worst {ratios.max():.4f}")
    assert ratios.mean() <= 1.05


@pytest.mark.parametrize("balance_all", [False, True])
def test_plans_conserve_requests_and_fit(balance_all):
    rng = np.random.default_rng(1)
    for _ in range(20):
        problem = random_problem(rng, 12, 6, capacity=5.0, move_costs=(0.0, 0.0))
        plan = solve_greedy(problem, balance_all=balance_all)
        check_plan(problem, plan)  # capacity, pins, moves reproduce the assignment
        np.testing.assert_array_equal(plan.assignment.sum(1), problem.queued.sum(1))
        assert plan.makespan <= keep_plan(problem).makespan + 1e-9


def test_greedy_scales_to_cluster_size():
    rng = np.random.default_rng(2)
    num_a, num_r = 2000, 200
    home = rng.integers(0, num_r, num_a)
    resident = np.zeros((num_a, num_r), dtype=bool)
    resident[np.arange(num_a), home] = True
    popularity = 1.0 / np.arange(1, num_a + 1)  # Zipf: a few hot adapters
    queued = np.where(resident, rng.poisson(200 * popularity[:, None]), 0)
    problem = PlacementProblem(
        capacity=np.full(num_r, 32.0),
        adapter_size=np.ones(num_a),
        resident=resident,
        queued=queued,
        cost=np.full(num_a, 128.0),
        pinned=resident,
        request_move_cost=1.0,
        adapter_move_cost=4.0,
    )
    start = time.perf_counter()
    plan = solve_greedy(problem, balance_all=True)
    elapsed = time.perf_counter() - start
    check_plan(problem, plan)
    lower_bound = problem.cost @ queued.sum(1) / num_r
    print(
        f"greedy 2000x200: {elapsed:.2f} s, makespan {plan.makespan:.0f}, bound {lower_bound:.0f}"
    )
    assert elapsed < 10.0
    assert plan.makespan <= 1.05 * max(lower_bound, 128.0) + 128.0


@pytest.mark.parametrize(
    "field, change",
    [
        ("queued", {"queued": [[-1, 0], [0, 0]]}),
        ("base_load", {"base_load": [0.0, -2.0]}),
        ("cost", {"cost": [1.0, -1.0]}),
        ("adapter_size", {"adapter_size": [3.0, 1.0]}),
        ("capacity", {"capacity": [2.0, -1.0]}),
        ("queued", {"queued": [[6, 1], [0, 0]]}),  # requests where the adapter is not held
        ("request_move_cost", {"request_move_cost": -0.1}),
    ],
)
def test_invalid_inputs_name_the_field(field, change):
    base = dict(
        capacity=[2.0, 2.0],
        adapter_size=[1.0, 1.0],
        resident=[[True, False], [False, True]],
        queued=[[6, 0], [0, 0]],
        cost=[1.0, 1.0],
    )
    with pytest.raises(ValueError, match=field):
        PlacementProblem(**{**base, **change})
