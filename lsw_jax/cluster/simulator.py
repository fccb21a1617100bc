"""Discrete-event simulator of a multi-replica LoRA serving cluster.

It asks one question: how much does dLoRA's periodic request-adapter co-migration
(:mod:`lsw_jax.cluster.placement`) cut tail latency under skewed, drifting adapter popularity,
compared with a static adapter-to-replica assignment?

Model (one replica = one model copy with its own adapter memory and continuous batching):

* Arrivals are Poisson at ``arrival_rate`` (or ``load`` times the cluster's nominal capacity).
  Adapter popularity is Zipf(``zipf_alpha``) over a random permutation of adapters; every
  ``drift_interval`` a ``drift_fraction`` of popularity ranks is reshuffled, and bursts
  (Poisson, ``burst_rate`` per second) give one random adapter ``burst_share`` of the traffic
  for ``burst_duration`` seconds. Output lengths are geometric with mean ``mean_output_tokens``.
* A replica runs decode steps over a batch of up to ``max_batch`` requests. One step makes one
  token per request and takes ``StepCostTable.step_time(batch, merged)``; a batch whose
  requests all share one adapter runs merged, a mixed batch unmerged (dLoRA). New requests
  join at step boundaries, oldest first among adapters that are loaded. Prefill is folded into
  the step costs (not modelled separately).
* Adapters live in ``replica_slots`` slots of ``adapter_bytes``. Loading one takes
  ``load_latency + adapter_bytes / load_bandwidth`` on the replica's host link (one load at a
  time); idle, unpinned copies are evicted least recently used. Every adapter has a pinned
  home copy (``hash`` or ``round_robin`` of its id).
* Policies: ``none`` sends each request to its adapter's home replica and never migrates;
  ``greedy`` / ``exact`` dispatch each request to the least loaded replica holding its adapter
  and, every ``period`` seconds, solve the co-migration problem on the queued requests
  (:func:`~lsw_jax.cluster.placement.solve_greedy` or ``solve_exact``) and apply the plan:
  evictions, adapter copies (loads), then queued-request moves. Running requests never move.
  Planner wall time is not charged to simulated time (it is reported).

Latency is arrival to last token. Requests unfinished when the simulation stops count with
their age at the stop time (a lower bound), so an overloaded policy cannot hide its backlog.
Everything is deterministic given ``ClusterConfig.seed``.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from dataclasses import asdict, dataclass, field

import numpy as np

from lsw_jax.cluster import placement

__all__ = [
    "ClusterConfig",
    "MigrationPolicy",
    "SimResult",
    "StepCostTable",
    "generate_workload",
    "simulate",
]


@dataclass(frozen=True)
class StepCostTable:
    """Seconds per decode step vs batch size, merged (one adapter) and unmerged (mixed).

    The defaults are PLACEHOLDERS (a 7B-class model on one GPU, shaped like dLoRA's
    measurements: merged a little cheaper than unmerged, the gap growing with the batch) until
    the serving benchmark supplies measured values; load those with :meth:`from_dict`.
    """

    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    merged_s: tuple[float, ...] = (0.0130, 0.0131, 0.0133, 0.0137, 0.0146, 0.0165, 0.0205)
    unmerged_s: tuple[float, ...] = (0.0140, 0.0142, 0.0146, 0.0154, 0.0170, 0.0202, 0.0268)
    measured: bool = False

    def __post_init__(self):
        n = len(self.batch_sizes)
        if len(self.merged_s) != n or len(self.unmerged_s) != n:
            raise ValueError(f"merged_s and unmerged_s need {n=} entries like batch_sizes")
        if list(self.batch_sizes) != sorted(set(self.batch_sizes)) or self.batch_sizes[0] < 1:
            raise ValueError(f"batch_sizes={self.batch_sizes} must be increasing and >= 1")
        if min(self.merged_s + self.unmerged_s) <= 0:
            raise ValueError("step times must be positive")

    @classmethod
    def from_dict(cls, d: dict) -> StepCostTable:
        """From ``{"batch_sizes": [...], "merged_s": [...], "unmerged_s": [...]}``."""
        return cls(
            tuple(int(b) for b in d["batch_sizes"]),
            tuple(float(t) for t in d["merged_s"]),
            tuple(float(t) for t in d["unmerged_s"]),
            measured=bool(d.get("measured", True)),
        )

    def step_time(self, batch: int, merged: bool) -> float:
        """Linear interpolation in batch size (clamped at the table's ends)."""
        times = self.merged_s if merged else self.unmerged_s
        return float(np.interp(batch, self.batch_sizes, times))


@dataclass(frozen=True)
class ClusterConfig:
    """Cluster, workload and cost parameters (see the module docstring)."""

    num_replicas: int = 200
    num_adapters: int = 2000
    adapter_bytes: float = 64 * 2**20
    replica_slots: int = 32
    load_bandwidth: float = 25e9  # host-to-device bytes/s
    load_latency: float = 1e-3
    max_batch: int = 32
    mean_output_tokens: float = 128.0
    max_output_tokens: int = 1024
    load: float = 0.7  # fraction of nominal capacity; ignored when arrival_rate is set
    arrival_rate: float | None = None
    duration: float = 60.0
    warmup: float = 5.0  # requests arriving earlier are not measured
    zipf_alpha: float = 1.0
    drift_interval: float = 10.0
    drift_fraction: float = 0.1
    burst_rate: float = 0.05
    burst_share: float = 0.05
    burst_duration: float = 5.0
    popularity_tick: float = 1.0
    step_costs: StepCostTable = field(default_factory=StepCostTable)
    seed: int = 0

    def __post_init__(self):
        for name in ("num_replicas", "num_adapters", "max_batch", "replica_slots"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("adapter_bytes", "load_bandwidth", "mean_output_tokens", "duration"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        need = -(-self.num_adapters // self.num_replicas) + 1
        if self.replica_slots < need:
            raise ValueError(
                f"replica_slots={self.replica_slots} must hold the home adapters plus one: "
                f"need >= {need}"
            )
        if not 0 <= self.drift_fraction <= 1 or not 0 <= self.burst_share < 1:
            raise ValueError("drift_fraction must be in [0, 1] and burst_share in [0, 1)")

    def nominal_rate(self) -> float:
        """Requests/s the cluster serves with every replica at full, unmerged batches."""
        tokens_per_s = self.max_batch / self.step_costs.step_time(self.max_batch, merged=False)
        return self.num_replicas * tokens_per_s / self.mean_output_tokens

    def rate(self) -> float:
        return (
            self.arrival_rate if self.arrival_rate is not None else self.load * self.nominal_rate()
        )


@dataclass(frozen=True)
class MigrationPolicy:
    """``name``: ``none`` | ``greedy`` | ``exact``; ``home``: ``hash`` | ``round_robin``.

    ``request_move_cost`` is in tokens per moved request; a copy costs ``copy_cost_scale``
    times the tokens a replica would decode while the copy loads.
    """

    name: str = "greedy"
    home: str = "hash"
    period: float = 1.0
    request_move_cost: float = 1.0
    copy_cost_scale: float = 1.0
    candidates: int = 8
    exact_time_limit: float = 5.0

    def __post_init__(self):
        if self.name not in ("none", "greedy", "exact"):
            raise ValueError(f"name={self.name!r} must be 'none', 'greedy' or 'exact'")
        if self.home not in ("hash", "round_robin"):
            raise ValueError(f"home={self.home!r} must be 'hash' or 'round_robin'")
        if not self.period > 0:
            raise ValueError(f"period={self.period} must be positive")


@dataclass(frozen=True)
class SimResult:
    """Latencies in seconds (arrival to last token), throughput over the whole run."""

    policy: str
    load: float
    arrival_rate: float
    p50: float
    p90: float
    p99: float
    mean: float
    throughput_rps: float
    throughput_tps: float
    submitted: int
    completed: int
    unfinished: int
    requests_moved: int
    adapter_loads: int
    bytes_loaded: float
    plans: int
    planner_s: float
    wall_s: float

    def to_dict(self) -> dict:
        return asdict(self)


def home_replicas(num_adapters: int, num_replicas: int, how: str) -> np.ndarray:
    """Static adapter -> replica assignment: ``a % R`` or a multiplicative hash of ``a``."""
    ids = np.arange(num_adapters, dtype=np.uint64)
    if how == "round_robin":
        return (ids % np.uint64(num_replicas)).astype(np.int64)
    hashed = (ids * np.uint64(2654435761) + np.uint64(12345)) % np.uint64(2**32)
    return (hashed % np.uint64(num_replicas)).astype(np.int64)


def generate_workload(cfg: ClusterConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns sorted ``(arrival_s [N], adapter [N], output_tokens [N])`` for ``cfg``."""
    rng = np.random.default_rng(cfg.seed)
    num_a = cfg.num_adapters
    zipf = 1.0 / np.arange(1, num_a + 1) ** cfg.zipf_alpha
    zipf /= zipf.sum()
    rank_of = rng.permutation(num_a)  # adapter -> popularity rank
    bursts: list[tuple[float, int]] = []  # (end time, adapter)
    times, adapters = [], []
    tick = cfg.popularity_tick
    next_drift = cfg.drift_interval
    t = 0.0
    while t < cfg.duration:
        dt = min(tick, cfg.duration - t)
        if t >= next_drift:
            moved = rng.choice(num_a, int(cfg.drift_fraction * num_a), replace=False)
            rank_of[moved] = rank_of[rng.permutation(moved)]
            next_drift += cfg.drift_interval
        bursts = [b for b in bursts if b[0] > t]
        for _ in range(rng.poisson(cfg.burst_rate * dt)):
            bursts.append((t + cfg.burst_duration, int(rng.integers(num_a))))
        p = zipf[rank_of]
        share = min(cfg.burst_share * len(bursts), 0.5)
        p = p * (1 - share)
        for _, a in bursts:
            p[a] += share / len(bursts)
        n = rng.poisson(cfg.rate() * dt)
        times.append(np.sort(rng.uniform(t, t + dt, n)))
        adapters.append(rng.choice(num_a, n, p=p / p.sum()))
        t += dt
    arrival = np.concatenate(times)
    adapter = np.concatenate(adapters).astype(np.int64)
    tokens = np.minimum(
        rng.geometric(1.0 / cfg.mean_output_tokens, arrival.size), cfg.max_output_tokens
    )
    return arrival, adapter, tokens.astype(np.int64)


class _Replica:
    __slots__ = ("queues", "running", "t_last", "step", "version", "ready", "loading",
                 "link_free", "last_used", "adapter_count")  # fmt: skip

    def __init__(self):
        self.queues: dict[int, deque] = {}  # adapter -> request ids, oldest first
        self.running: list[list[int]] = []  # [request id, tokens left]
        self.t_last = 0.0  # time of the last step boundary
        self.step = 0.0  # current step duration
        self.version = 0  # bumps invalidate scheduled wake-ups
        self.ready: set[int] = set()
        self.loading: set[int] = set()
        self.link_free = 0.0
        self.last_used: dict[int, float] = {}
        self.adapter_count: dict[int, int] = {}  # adapter -> running requests


class _Cluster:
    """Mutable simulation state; ``simulate`` drives it."""

    _WAKE, _READY, _PLAN = 0, 1, 2

    def __init__(self, cfg: ClusterConfig, policy: MigrationPolicy, workload):
        self.cfg, self.policy = cfg, policy
        self.arrival, self.adapter, self.tokens = workload
        self.finish = np.full(self.arrival.size, np.nan)
        num_a, num_r = cfg.num_adapters, cfg.num_replicas
        self.home = home_replicas(num_a, num_r, policy.home)
        self.replicas = [_Replica() for _ in range(num_r)]
        self.resident = np.zeros((num_a, num_r), dtype=bool)  # ready or loading
        self.home_mask = np.zeros((num_a, num_r), dtype=bool)
        self.home_mask[np.arange(num_a), self.home] = True
        self.queued = np.zeros((num_a, num_r), dtype=np.int64)
        self.queue_len = np.zeros(num_r, dtype=np.int64)
        for a, r in enumerate(self.home):
            self.resident[a, r] = True
            self.replicas[r].ready.add(a)
        self.events: list = []
        self.seq = 0
        self.load_s = cfg.load_latency + cfg.adapter_bytes / cfg.load_bandwidth
        self.adapter_loads = 0
        self.requests_moved = 0
        self.plans = 0
        self.planner_s = 0.0

    # -- events -------------------------------------------------------------------------------
    def push(self, t, kind, r, a=0):
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, r, a))

    def schedule_wake(self, r: int, t: float):
        rep = self.replicas[r]
        rep.version += 1
        self.push(t, self._WAKE, r, rep.version)

    # -- replica mechanics --------------------------------------------------------------------
    def sync(self, rep: _Replica, t: float):
        """Advances ``rep`` to the last step boundary at or before ``t``."""
        if not rep.running:
            rep.t_last = t
            return
        n = int((t - rep.t_last) / rep.step + 1e-9)
        if n:
            for item in rep.running:
                item[1] -= n
            rep.t_last += n * rep.step

    def nudge(self, r: int, t: float):
        """Something became admissible on ``r``: admit at the next step boundary (idle: now,
        after every other arrival at the same instant, so that they share the first step)."""
        rep = self.replicas[r]
        if not rep.running:
            self.schedule_wake(r, t)
        elif len(rep.running) < self.cfg.max_batch:
            self.sync(rep, t)
            self.schedule_wake(r, rep.t_last + rep.step)

    def wake(self, r: int, t: float):
        rep = self.replicas[r]
        self.sync(rep, t)
        t = rep.t_last if rep.running else t
        still = []
        for item in rep.running:
            if item[1] <= 0:
                rid = item[0]
                self.finish[rid] = t
                a = int(self.adapter[rid])
                rep.adapter_count[a] -= 1
                if rep.adapter_count[a] == 0:
                    del rep.adapter_count[a]
                rep.last_used[a] = t
            else:
                still.append(item)
        rep.running = still
        self.admit(r, t)
        if rep.running:
            rep.t_last = t
            merged = len(rep.adapter_count) == 1
            rep.step = self.cfg.step_costs.step_time(len(rep.running), merged)
            left = min(item[1] for item in rep.running)
            self.schedule_wake(r, t + left * rep.step)

    def admit(self, r: int, t: float):
        rep = self.replicas[r]
        while len(rep.running) < self.cfg.max_batch and rep.queues:
            best, best_t = -1, np.inf
            for a, q in rep.queues.items():
                if a in rep.ready:
                    if self.arrival[q[0]] < best_t:
                        best, best_t = a, self.arrival[q[0]]
                elif a not in rep.loading:
                    self.load_adapter(r, a, t)
            if best < 0:
                return
            q = rep.queues[best]
            rid = q.popleft()
            if not q:
                del rep.queues[best]
            self.queued[best, r] -= 1
            self.queue_len[r] -= 1
            rep.running.append([rid, int(self.tokens[rid])])
            rep.adapter_count[best] = rep.adapter_count.get(best, 0) + 1
            rep.last_used[best] = t

    def evictable(self, r: int, a: int) -> bool:
        rep = self.replicas[r]
        return (
            a in rep.ready
            and not self.home_mask[a, r]
            and a not in rep.adapter_count
            and a not in rep.queues
        )

    def evict(self, r: int, a: int):
        rep = self.replicas[r]
        rep.ready.discard(a)
        rep.last_used.pop(a, None)
        self.resident[a, r] = False

    def load_adapter(self, r: int, a: int, t: float) -> bool:
        """Starts loading ``a`` onto ``r`` (LRU-evicting idle copies); False if no room."""
        rep = self.replicas[r]
        if a in rep.ready or a in rep.loading:
            return True
        held = len(rep.ready) + len(rep.loading)
        if held >= self.cfg.replica_slots:
            idle = [b for b in rep.ready if self.evictable(r, b)]
            if not idle:
                return False
            self.evict(r, min(idle, key=lambda b: rep.last_used.get(b, 0.0)))
        rep.loading.add(a)
        self.resident[a, r] = True
        start = max(t, rep.link_free)
        rep.link_free = start + self.load_s
        self.adapter_loads += 1
        self.push(rep.link_free, self._READY, r, a)
        return True

    def loaded(self, r: int, a: int, t: float):
        rep = self.replicas[r]
        rep.loading.discard(a)
        rep.ready.add(a)
        rep.last_used[a] = t
        if a in rep.queues:
            self.nudge(r, t)

    def enqueue(self, r: int, a: int, rids, t: float):
        rep = self.replicas[r]
        q = rep.queues.get(a)
        if q is None:
            rep.queues[a] = deque(rids)
        elif self.arrival[rids[0]] >= self.arrival[q[-1]]:
            q.extend(rids)
        else:  # keep oldest-first order (moved requests may be older than local ones)
            rep.queues[a] = deque(sorted([*q, *rids], key=lambda i: (self.arrival[i], i)))
        self.queued[a, r] += len(rids)
        self.queue_len[r] += len(rids)
        if a not in rep.ready:
            self.load_adapter(r, a, t)
        self.nudge(r, t)

    # -- dispatch and co-migration ------------------------------------------------------------
    def dispatch(self, rid: int, t: float):
        a = int(self.adapter[rid])
        if self.policy.name == "none":
            r = int(self.home[a])
        else:
            holders = np.flatnonzero(self.resident[a])
            busy = self.queue_len[holders] + np.array(
                [len(self.replicas[h].running) for h in holders]
            )
            r = int(holders[np.argmin(busy)])
        self.enqueue(r, a, [rid], t)

    def problem(self, t: float) -> placement.PlacementProblem:
        cfg = self.cfg
        base = np.zeros(cfg.num_replicas)
        pinned = self.home_mask.copy()
        for r, rep in enumerate(self.replicas):
            self.sync(rep, t)
            base[r] = sum(item[1] for item in rep.running)
            for a in rep.adapter_count:
                pinned[a, r] = True
            for a in rep.loading:
                pinned[a, r] = True
        tokens_per_s = cfg.max_batch / cfg.step_costs.step_time(cfg.max_batch, merged=False)
        per_byte = self.policy.copy_cost_scale * tokens_per_s * self.load_s / cfg.adapter_bytes
        return placement.PlacementProblem(
            capacity=np.full(cfg.num_replicas, cfg.replica_slots * cfg.adapter_bytes),
            adapter_size=np.full(cfg.num_adapters, cfg.adapter_bytes),
            resident=self.resident.copy(),
            queued=self.queued.copy(),
            cost=np.full(cfg.num_adapters, cfg.mean_output_tokens),
            base_load=base,
            pinned=pinned,
            request_move_cost=self.policy.request_move_cost,
            adapter_move_cost=per_byte,
        )

    def rebalance(self, t: float):
        start = time.perf_counter()
        prob = self.problem(t)
        if self.policy.name == "exact":
            plan = placement.solve_exact(prob, time_limit=self.policy.exact_time_limit)
        else:
            plan = placement.solve_greedy(prob, candidates=self.policy.candidates, balance_all=True)
        self.planner_s += time.perf_counter() - start
        self.plans += 1
        for a, r in plan.evictions:
            if self.evictable(r, a):
                self.evict(r, a)
        for c in plan.adapter_copies:
            self.load_adapter(c.dst, c.adapter, t)
        for m in plan.request_moves:
            src = self.replicas[m.src]
            q = src.queues[m.adapter]
            rids = [q.popleft() for _ in range(m.count)]  # oldest first: they waited longest
            if not q:
                del src.queues[m.adapter]
            self.queued[m.adapter, m.src] -= m.count
            self.queue_len[m.src] -= m.count
            self.requests_moved += m.count
            self.enqueue(m.dst, m.adapter, rids, t)

    def run(self):
        n = self.arrival.size
        i = 0
        if self.policy.name != "none":
            self.push(self.policy.period, self._PLAN, 0)
        end = self.cfg.duration
        while True:
            t_event = self.events[0][0] if self.events else np.inf
            t_arrival = self.arrival[i] if i < n else np.inf
            if min(t_event, t_arrival) > end:
                return
            if t_arrival <= t_event:
                self.dispatch(i, float(t_arrival))
                i += 1
                continue
            t, _, kind, r, a = heapq.heappop(self.events)
            if kind == self._WAKE:
                if a == self.replicas[r].version:
                    self.wake(r, t)
            elif kind == self._READY:
                self.loaded(r, a, t)
            else:
                self.rebalance(t)
                self.push(t + self.policy.period, self._PLAN, 0)


def simulate(cfg: ClusterConfig, policy: MigrationPolicy, workload=None) -> SimResult:
    """Runs one simulation; pass ``workload`` (from :func:`generate_workload`) to reuse it."""
    start = time.perf_counter()
    workload = generate_workload(cfg) if workload is None else workload
    cluster = _Cluster(cfg, policy, workload)
    cluster.run()
    arrival, finish, tokens = cluster.arrival, cluster.finish, cluster.tokens
    done = ~np.isnan(finish)
    latency = np.where(done, finish - arrival, cfg.duration - arrival)
    measured = latency[arrival >= cfg.warmup]
    pct = np.percentile(measured, [50, 90, 99]) if measured.size else np.full(3, np.nan)
    return SimResult(
        policy=policy.name,
        load=cfg.rate() / cfg.nominal_rate(),
        arrival_rate=cfg.rate(),
        p50=float(pct[0]),
        p90=float(pct[1]),
        p99=float(pct[2]),
        mean=float(measured.mean()) if measured.size else float("nan"),
        throughput_rps=float(done.sum() / cfg.duration),
        throughput_tps=float(tokens[done].sum() / cfg.duration),
        submitted=int(arrival.size),
        completed=int(done.sum()),
        unfinished=int((~done).sum()),
        requests_moved=cluster.requests_moved,
        adapter_loads=cluster.adapter_loads,
        bytes_loaded=float(cluster.adapter_loads * cfg.adapter_bytes),
        plans=cluster.plans,
        planner_s=cluster.planner_s,
        wall_s=time.perf_counter() - start,
    )
