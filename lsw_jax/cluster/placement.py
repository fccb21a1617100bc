"""Request-adapter co-migration across replicas (dLoRA's replica manager).

A cluster of model replicas each keeps a few LoRA adapters in device memory and a queue of
requests that name an adapter. When popularity is skewed, the replicas that hold the hot
adapters overload while others idle. The replica manager periodically decides which queued
requests move to which replica and which adapters are copied (or evicted) so that the most
loaded replica's load is as small as possible, for a small price per move.

Notation (A adapters ``a``, R replicas ``r``):

* ``q[a, r]``        queued requests of adapter ``a`` at replica ``r`` (movable);
* ``c[a]``           expected cost of one request of ``a`` (tokens still to generate);
* ``b[r]``           base load of ``r`` (running requests' remaining tokens; not movable);
* ``s[a]``, ``C[r]`` adapter size and replica adapter-memory capacity (bytes, or slots with
  ``s = 1``);
* ``h[a, r]``        1 if ``r`` holds ``a`` now; ``p[a, r]`` 1 if ``a`` must stay on ``r``
  (in use by a running request, or pinned as its home copy).

A plan chooses the final request counts ``x[a, r]`` and placement ``y[a, r]``; its load is
``L[r] = b[r] + sum_a c[a] x[a, r]`` and its objective is

    max_r L[r] + beta * sum_{a,r} max(0, x[a,r] - q[a,r])        (requests moved)
               + alpha * sum_{a,r} s[a] y[a,r] (1 - h[a,r])       (bytes copied)
               + gamma * sum_{a,r} h[a,r] (1 - y[a,r])            (evictions)

with ``beta`` = ``request_move_cost`` (load units per moved request), ``alpha`` =
``adapter_move_cost`` (load units per byte copied) and ``gamma`` = ``eviction_cost`` (a tie
breaker that keeps idle copies unless memory is needed). Everything is in load units
(tokens), so the penalties read as "a copy of this adapter is worth ``alpha * s`` tokens of
makespan".

Two solvers return the same :class:`Plan`: :func:`solve_exact` (a MILP with HiGHS through
``scipy.optimize.milp``) and :func:`solve_greedy` (dLoRA-style greedy, fast at hundreds of
replicas and thousands of adapters).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.optimize
import scipy.sparse as sp

__all__ = [
    "AdapterCopy",
    "Plan",
    "PlacementProblem",
    "RequestMove",
    "check_plan",
    "evaluate",
    "keep_plan",
    "plan_from_assignment",
    "solve_exact",
    "solve_greedy",
]

_TOL = 1e-9


@dataclass(frozen=True)
class PlacementProblem:
    """One instance of the co-migration problem (see the module docstring for symbols).

    Attributes:
      capacity: ``[R]`` adapter memory per replica (bytes, or slots).
      adapter_size: ``[A]`` bytes (or slots) of each adapter.
      resident: ``[A, R]`` bool, ``h``: replica holds the adapter now.
      queued: ``[A, R]`` int, ``q``: queued (movable) requests; only where ``resident``.
      cost: ``[A]`` expected load of one request (tokens).
      base_load: ``[R]`` non-movable load (running requests); zeros when None.
      pinned: ``[A, R]`` bool, ``p``: copies that must stay; ``pinned <= resident``.
      request_move_cost: ``beta``, load units per moved request.
      adapter_move_cost: ``alpha``, load units per copied byte (or slot).
      eviction_cost: ``gamma``, load units per evicted copy.
    """

    capacity: np.ndarray
    adapter_size: np.ndarray
    resident: np.ndarray
    queued: np.ndarray
    cost: np.ndarray
    base_load: np.ndarray | None = None
    pinned: np.ndarray | None = None
    request_move_cost: float = 0.0
    adapter_move_cost: float = 0.0
    eviction_cost: float = 1e-6

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)

        put("capacity", np.asarray(self.capacity, dtype=np.float64))
        put("adapter_size", np.asarray(self.adapter_size, dtype=np.float64))
        put("resident", np.asarray(self.resident, dtype=bool))
        put("cost", np.asarray(self.cost, dtype=np.float64))
        queued = np.asarray(self.queued)
        if queued.size and not np.array_equal(queued, np.round(queued)):
            raise ValueError("queued must hold whole request counts")
        put("queued", queued.astype(np.int64))
        num_replicas = self.capacity.shape[0] if self.capacity.ndim == 1 else -1
        base = np.zeros(num_replicas) if self.base_load is None else self.base_load
        put("base_load", np.asarray(base, dtype=np.float64))
        pinned = np.zeros_like(self.resident) if self.pinned is None else self.pinned
        put("pinned", np.asarray(pinned, dtype=bool))
        self._validate()

    def _validate(self):
        if self.capacity.ndim != 1:
            raise ValueError(f"capacity must be [R], got shape {self.capacity.shape}")
        if self.adapter_size.ndim != 1:
            raise ValueError(f"adapter_size must be [A], got shape {self.adapter_size.shape}")
        shape = (self.num_adapters, self.num_replicas)
        for name in ("resident", "queued", "pinned"):
            if getattr(self, name).shape != shape:
                raise ValueError(
                    f"{name} must be [A, R] = {shape}, got {getattr(self, name).shape}"
                )
        if self.cost.shape != (self.num_adapters,):
            raise ValueError(f"cost must be [A] = ({self.num_adapters},), got {self.cost.shape}")
        if self.base_load.shape != (self.num_replicas,):
            raise ValueError(f"base_load must be [R], got {self.base_load.shape}")
        for name in ("capacity", "adapter_size", "queued", "cost", "base_load"):
            values = getattr(self, name)
            if not np.all(np.isfinite(values)):
                raise ValueError(f"{name} must be finite")
            if np.any(values < 0):
                raise ValueError(f"{name} must be non-negative, got min {values.min()}")
        for name in ("request_move_cost", "adapter_move_cost", "eviction_cost"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be non-negative")
        if self.num_replicas and np.any(self.adapter_size > self.capacity.max()):
            a = int(np.argmax(self.adapter_size > self.capacity.max()))
            raise ValueError(
                f"adapter_size[{a}]={self.adapter_size[a]} exceeds every replica's capacity "
                f"(max {self.capacity.max()})"
            )
        if np.any(self.pinned & ~self.resident):
            raise ValueError("pinned copies must be resident")
        if np.any((self.queued > 0) & ~self.resident):
            a, r = np.argwhere((self.queued > 0) & ~self.resident)[0]
            raise ValueError(f"queued[{a}, {r}] > 0 but replica {r} does not hold adapter {a}")
        used = self.adapter_size @ self.resident  # [R]
        if np.any(used > self.capacity + _TOL):
            r = int(np.argmax(used - self.capacity))
            raise ValueError(f"resident adapters on replica {r} exceed capacity[{r}]")

    @property
    def num_adapters(self) -> int:
        return self.adapter_size.shape[0]

    @property
    def num_replicas(self) -> int:
        return self.capacity.shape[0]

    def loads(self, assignment: np.ndarray) -> np.ndarray:
        """``L[r] = b[r] + sum_a c[a] x[a, r]`` for an ``[A, R]`` assignment."""
        return self.base_load + self.cost @ assignment


@dataclass(frozen=True)
class RequestMove:
    """Move ``count`` queued requests of ``adapter`` from replica ``src`` to ``dst``."""

    adapter: int
    src: int
    dst: int
    count: int


@dataclass(frozen=True)
class AdapterCopy:
    """Load ``adapter`` onto replica ``dst``; ``src`` is a replica holding it (None: host)."""

    adapter: int
    dst: int
    src: int | None


@dataclass(frozen=True)
class Plan:
    """A co-migration decision.

    Attributes:
      assignment: ``[A, R]`` int, ``x``: requests of each adapter per replica after the plan.
      placement: ``[A, R]`` bool, ``y``: copies held after the plan.
      request_moves: queued-request moves that turn ``q`` into ``x`` (fewest moved requests).
      adapter_copies: copies to load (``y & ~h``).
      evictions: ``(adapter, replica)`` copies to drop (``h & ~y``).
      makespan: ``max_r L[r]`` after the plan.
      objective: makespan plus the move penalties.
      solver: ``"exact"``, ``"greedy"`` or ``"keep"``.
      optimal: True when the solver proved optimality (the MILP finished within its limit).
    """

    assignment: np.ndarray
    placement: np.ndarray
    request_moves: tuple[RequestMove, ...]
    adapter_copies: tuple[AdapterCopy, ...]
    evictions: tuple[tuple[int, int], ...]
    makespan: float
    objective: float
    solver: str
    optimal: bool = False

    @property
    def num_requests_moved(self) -> int:
        return sum(m.count for m in self.request_moves)


def evaluate(problem: PlacementProblem, assignment, placement) -> tuple[float, float]:
    """Returns ``(makespan, objective)`` of ``x = assignment``, ``y = placement``."""
    x = np.asarray(assignment)
    y = np.asarray(placement, dtype=bool)
    h = problem.resident
    makespan = float(problem.loads(x).max()) if problem.num_replicas else 0.0
    moved = np.maximum(x - problem.queued, 0).sum()
    copied = problem.adapter_size @ (y & ~h).sum(axis=1)
    evicted = (h & ~y).sum()
    objective = (
        makespan
        + problem.request_move_cost * moved
        + problem.adapter_move_cost * copied
        + problem.eviction_cost * evicted
    )
    return makespan, float(objective)


def check_plan(problem: PlacementProblem, plan: Plan) -> None:
    """Raises ValueError unless ``plan`` is feasible and its moves reproduce its assignment."""
    x, y = plan.assignment, plan.placement
    if x.shape != problem.queued.shape or y.shape != problem.resident.shape:
        raise ValueError("plan shapes do not match the problem")
    if np.any(x < 0):
        raise ValueError("plan.assignment has negative counts")
    if not np.array_equal(x.sum(axis=1), problem.queued.sum(axis=1)):
        raise ValueError("plan.assignment loses or duplicates requests (row sums differ)")
    if np.any((x > 0) & ~y):
        raise ValueError("plan.assignment sends requests to a replica without the adapter")
    if np.any(problem.pinned & ~y):
        raise ValueError("plan.placement evicts a pinned copy")
    if np.any(problem.adapter_size @ y > problem.capacity + _TOL):
        raise ValueError("plan.placement exceeds a replica's capacity")
    moved = problem.queued.copy()
    for m in plan.request_moves:
        moved[m.adapter, m.src] -= m.count
        moved[m.adapter, m.dst] += m.count
        if m.count <= 0 or moved[m.adapter, m.src] < 0:
            raise ValueError(f"invalid request move {m}")
    if not np.array_equal(moved, x):
        raise ValueError("plan.request_moves do not turn queued into assignment")
    copies = {(c.adapter, c.dst) for c in plan.adapter_copies}
    if copies != {tuple(map(int, ar)) for ar in np.argwhere(y & ~problem.resident)}:
        raise ValueError("plan.adapter_copies do not match placement")
    if set(plan.evictions) != {tuple(map(int, ar)) for ar in np.argwhere(problem.resident & ~y)}:
        raise ValueError("plan.evictions do not match placement")
    _, objective = evaluate(problem, x, y)
    if abs(objective - plan.objective) > 1e-6 * max(1.0, abs(objective)):
        raise ValueError(f"plan.objective={plan.objective} but the plan evaluates to {objective}")


def plan_from_assignment(
    problem: PlacementProblem, assignment, placement, *, solver: str, optimal: bool = False
) -> Plan:
    """Builds a :class:`Plan` (moves, copies, evictions, objective) from ``x`` and ``y``."""
    x = np.asarray(assignment, dtype=np.int64)
    y = np.asarray(placement, dtype=bool)
    h = problem.resident
    moves = []
    for a in np.flatnonzero(np.any(x != problem.queued, axis=1)):
        delta = x[a] - problem.queued[a]  # [R]; >0 receives, <0 sends
        sources = [[int(r), int(-delta[r])] for r in np.flatnonzero(delta < 0)]
        i = 0
        for dst in np.flatnonzero(delta > 0):
            need = int(delta[dst])
            while need:
                src, avail = sources[i]
                k = min(need, avail)
                moves.append(RequestMove(int(a), src, int(dst), k))
                need -= k
                sources[i][1] -= k
                if sources[i][1] == 0:
                    i += 1
    copies = []
    for a, r in np.argwhere(y & ~h):
        holders = np.flatnonzero(h[a])
        copies.append(AdapterCopy(int(a), int(r), int(holders[0]) if holders.size else None))
    evictions = tuple((int(a), int(r)) for a, r in np.argwhere(h & ~y))
    makespan, objective = evaluate(problem, x, y)
    return Plan(x, y, tuple(moves), tuple(copies), evictions, makespan, objective, solver, optimal)


def keep_plan(problem: PlacementProblem) -> Plan:
    """The do-nothing plan (``x = q``, ``y = h``)."""
    return plan_from_assignment(problem, problem.queued, problem.resident, solver="keep")


def solve_exact(problem: PlacementProblem, *, time_limit: float = 60.0) -> Plan:
    """Solves the co-migration problem exactly as a MILP (HiGHS via ``scipy.optimize.milp``).

    Variables: ``x[a, r]`` integer request counts, ``y[a, r]`` binary placement, ``m[a, r] >= 0``
    moved-in requests, and the makespan ``T``. With ``N[a] = sum_r q[a, r]``:

        minimise   T + beta sum m + alpha sum_{h=0} s[a] y[a, r] - gamma sum_{h=1} y[a, r]
        subject to sum_r x[a, r] = N[a]                        (every request placed once)
                   x[a, r] <= N[a] y[a, r]                     (requests only where held)
                   sum_a s[a] y[a, r] <= C[r]                  (adapter memory)
                   b[r] + sum_a c[a] x[a, r] <= T              (makespan)
                   x[a, r] - m[a, r] <= q[a, r]                (m >= moved-in requests)
                   p[a, r] <= y[a, r] <= [s[a] <= C[r]],  0 <= x[a, r] <= N[a]

    The eviction term ``gamma sum_h (1 - y)`` is written without its constant. At an optimum
    ``m = max(0, x - q)``, so the objective equals :func:`evaluate`'s. ``optimal`` is False
    when the time limit stopped HiGHS first (the best plan found is returned).
    """
    num_a, num_r = problem.num_adapters, problem.num_replicas
    n = num_a * num_r
    total = problem.queued.sum(axis=1).astype(np.float64)  # [A]
    h = problem.resident.ravel()
    size_ar = np.repeat(problem.adapter_size, num_r)  # [A*R], index a * R + r

    c = np.zeros(3 * n + 1)
    c[n : 2 * n] = np.where(h, -problem.eviction_cost, problem.adapter_move_cost * size_ar)
    c[2 * n : 3 * n] = problem.request_move_cost
    c[-1] = 1.0

    eye = sp.identity(n, format="csr")
    zeros = sp.csr_matrix((n, n))
    rows_per_a = sp.kron(sp.identity(num_a), np.ones((1, num_r)), format="csr")  # [A, A*R]
    rows_per_r = sp.kron(np.ones((1, num_a)), sp.identity(num_r), format="csr")  # [R, A*R]
    conserve = sp.hstack([rows_per_a, sp.csr_matrix((num_a, 2 * n + 1))])
    link = sp.hstack([eye, -sp.diags(np.repeat(total, num_r)), zeros, sp.csr_matrix((n, 1))])
    memory = sp.hstack(
        [sp.csr_matrix((num_r, n)), rows_per_r @ sp.diags(size_ar), sp.csr_matrix((num_r, n + 1))]
    )
    makespan = sp.hstack(
        [rows_per_r @ sp.diags(np.repeat(problem.cost, num_r)), sp.csr_matrix((num_r, 2 * n)),
         -np.ones((num_r, 1))]
    )  # fmt: skip
    moved = sp.hstack([eye, zeros, -eye, sp.csr_matrix((n, 1))])
    constraints = [
        scipy.optimize.LinearConstraint(conserve, total, total),
        scipy.optimize.LinearConstraint(link, -np.inf, 0.0),
        scipy.optimize.LinearConstraint(memory, -np.inf, problem.capacity),
        scipy.optimize.LinearConstraint(makespan, -np.inf, -problem.base_load),
        scipy.optimize.LinearConstraint(moved, -np.inf, problem.queued.ravel().astype(float)),
    ]
    fits = (problem.adapter_size[:, None] <= problem.capacity[None, :]).ravel()
    lower = np.concatenate([np.zeros(n), problem.pinned.ravel().astype(float), np.zeros(n + 1)])
    # Finite bounds on m and T (HiGHS's presolve has failed on some instances without them).
    t_max = problem.base_load.max() + problem.cost @ total
    upper = np.concatenate(
        [np.repeat(total, num_r), fits.astype(float), np.repeat(total, num_r), [t_max]]
    )
    integrality = np.concatenate([np.ones(2 * n), np.zeros(n + 1)])
    result = scipy.optimize.milp(
        c,
        constraints=constraints,
        integrality=integrality,
        bounds=scipy.optimize.Bounds(lower, upper),
        options={"time_limit": time_limit, "mip_rel_gap": 0.0},
    )
    if result.x is None:
        raise RuntimeError(f"MILP found no solution: {result.message}")
    x = np.round(result.x[:n]).astype(np.int64).reshape(num_a, num_r)
    y = (result.x[n : 2 * n] > 0.5).reshape(num_a, num_r)
    return plan_from_assignment(problem, x, y, solver="exact", optimal=result.status == 0)


def solve_greedy(
    problem: PlacementProblem,
    *,
    candidates: int = 8,
    max_moves: int | None = None,
    balance_all: bool = False,
) -> Plan:
    """dLoRA-style greedy co-migration.

    Repeatedly takes the most loaded replica ``src`` and the ``candidates`` least loaded
    replicas; for every adapter queued on ``src`` and every candidate ``dst`` it computes the
    number of requests ``k`` that best balances the pair (``max(L_src - k c, L_dst + k c)``
    smallest) and the move's price (moved requests, plus a copy of the adapter when ``dst``
    lacks it, evicting idle unpinned copies on ``dst`` when memory is short). It applies the
    move with the largest pair improvement net of price, and stops when no move from the most
    loaded replica pays. Cost per move is ``O(candidates * (A_src + A))``.

    With ``balance_all`` it does not stop there: it sets that replica aside and goes on with
    the next most loaded one (balancing the whole cluster, as a serving system wants, at the
    price of move penalties that the makespan objective does not reward).
    """
    x = problem.queued.copy()
    y = problem.resident.copy()
    cost = problem.cost
    loads = problem.loads(x)
    num_r = problem.num_replicas
    max_moves = 50 * max(1, x.sum()) if max_moves is None else max_moves
    done = np.zeros(num_r, dtype=bool)  # replicas set aside (balance_all)
    for _ in range(max_moves):
        if num_r < 2 or done.all():
            break
        src = int(np.argmax(np.where(done, -np.inf, loads)))
        adapters = np.flatnonzero(x[:, src])  # [k_src]
        order = np.argsort(loads, kind="stable")
        dsts = order[(order != src) & ~done[order]][:candidates]  # [D]
        best = None
        if adapters.size and dsts.size:
            best = _best_move(problem, x, y, loads, src, adapters, dsts)
        if best is None:
            if not balance_all:
                break
            done[src] = True
            continue
        a, dst, k, evict = best
        if not y[a, dst]:
            y[evict, dst] = False
            y[a, dst] = True
        x[a, src] -= k
        x[a, dst] += k
        loads[src] -= k * cost[a]
        loads[dst] += k * cost[a]
    # Copies made earlier in the plan that ended up unused are dropped again.
    unused = y & ~problem.resident & (x == 0)
    y &= ~unused
    return plan_from_assignment(problem, x, y, solver="greedy")


def _best_move(problem, x, y, loads, src, adapters, dsts):
    """The best ``(adapter, dst, k, evict_ids)`` move from ``src``, or None if none pays."""
    cost = problem.cost[adapters][:, None]  # [k_src, 1]
    avail = x[adapters, src][:, None]  # [k_src, 1]
    gap = loads[src] - loads[dsts][None, :]  # [1, D]
    k_lo = np.clip(np.floor(gap / (2 * cost)), 0, avail)
    k_hi = np.clip(k_lo + 1, 0, avail)
    pair_lo = np.maximum(loads[src] - k_lo * cost, loads[dsts][None, :] + k_lo * cost)
    pair_hi = np.maximum(loads[src] - k_hi * cost, loads[dsts][None, :] + k_hi * cost)
    k = np.where(pair_hi < pair_lo, k_hi, k_lo).astype(np.int64)  # [k_src, D]
    gain = loads[src] - np.minimum(pair_lo, pair_hi)
    q_s = problem.queued[adapters, src][:, None]
    q_d = problem.queued[np.ix_(adapters, dsts)]
    x_s = avail
    x_d = x[np.ix_(adapters, dsts)]
    moved = (
        np.maximum(x_d + k - q_d, 0) - np.maximum(x_d - q_d, 0)
        + np.maximum(x_s - k - q_s, 0) - np.maximum(x_s - q_s, 0)
    )  # fmt: skip
    price = problem.request_move_cost * moved
    needs_copy = ~y[np.ix_(adapters, dsts)]
    size = problem.adapter_size[adapters][:, None]
    copy_price = np.where(
        problem.resident[np.ix_(adapters, dsts)], -problem.eviction_cost,
        problem.adapter_move_cost * size,
    )  # fmt: skip
    price = price + np.where(needs_copy, copy_price, 0.0)
    net = np.where(k > 0, gain - price, -np.inf)
    for flat in np.argsort(-net, axis=None, kind="stable"):
        i, j = np.unravel_index(flat, net.shape)
        if net[i, j] <= _TOL:
            return None
        a, dst = int(adapters[i]), int(dsts[j])
        if not needs_copy[i, j]:
            return a, dst, int(k[i, j]), np.zeros(0, dtype=np.int64)
        evict = _make_room(problem, x, y, a, dst)
        if evict is None:
            continue
        evict_price = problem.eviction_cost * problem.resident[evict, dst].sum()
        if net[i, j] - evict_price > _TOL:
            return a, dst, int(k[i, j]), evict
    return None


def _make_room(problem, x, y, a, dst):
    """Idle unpinned copies on ``dst`` to evict so that adapter ``a`` fits, or None."""
    size = problem.adapter_size
    free = problem.capacity[dst] - size @ y[:, dst]
    if free + _TOL >= size[a]:
        return np.zeros(0, dtype=np.int64)
    idle = np.flatnonzero(y[:, dst] & ~problem.pinned[:, dst] & (x[:, dst] == 0))
    idle = idle[np.argsort(-size[idle], kind="stable")]  # largest first: fewest evictions
    room = free + np.cumsum(size[idle])
    enough = np.flatnonzero(room + _TOL >= size[a])
    if enough.size == 0:
        return None
    return idle[: enough[0] + 1]
