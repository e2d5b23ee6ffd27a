"""The controller's decisions over time, on a simulated clock and fleet.

A tiny simulation of SQS and EC2: messages arrive, instances boot after a
delay, each running instance takes up to 10 messages and finishes one every
`seconds_per_image`. The real `decide` drives it once a second.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from controller.observe import Instance, Observation
from controller.policy import Policy, decide


@dataclass
class SimInstance:
    id: str
    number: int
    launched_at: float
    holding: int = 0
    progress: float = 0.0


@dataclass
class World:
    boot_s: float = 3.0
    seconds_per_image: float = 0.5
    now: float = 0.0
    visible: int = 0
    done: int = 0
    instances: dict[str, SimInstance] = field(default_factory=dict)
    launched: int = 0

    def observation(self) -> Observation:
        return Observation(
            at=self.now, clock=self.now, visible=self.visible,
            in_flight=sum(i.holding for i in self.instances.values()), delayed=0,
            instances=tuple(Instance(i.id, i.number, self._state(i), i.launched_at)
                            for i in self.instances.values()))

    def _state(self, inst: SimInstance) -> str:
        return "running" if self.now - inst.launched_at >= self.boot_s else "pending"

    def apply(self, decision) -> None:
        for iid in decision.terminate:
            inst = self.instances.pop(iid)
            self.visible += inst.holding  # a warm shutdown hands its batch back
        for n in decision.launch:
            self.launched += 1
            iid = f"i-{self.launched}"
            self.instances[iid] = SimInstance(iid, n, self.now)

    def advance(self, dt: float) -> None:
        self.now += dt
        for inst in self.instances.values():
            if self._state(inst) != "running":
                continue
            if inst.holding == 0 and self.visible:
                inst.holding = min(10, self.visible)
                self.visible -= inst.holding
            inst.progress += dt / self.seconds_per_image
            finished = min(inst.holding, int(inst.progress))
            inst.holding -= finished
            inst.progress -= finished
            self.done += finished
            if inst.holding == 0:
                inst.progress = 0.0


def run(world: World, policy: Policy, seconds: int, arrivals: dict[int, int]) -> list[int]:
    counts = []
    for t in range(seconds):
        world.visible += arrivals.get(t, 0)
        world.apply(decide(world.observation(), policy))
        counts.append(len(world.instances))
        world.advance(1.0)
    return counts


def test_burst_of_100_reaches_15_never_more_and_returns_to_0():
    world = World()
    counts = run(world, Policy(), seconds=120, arrivals={0: 100})
    assert max(counts) == 15
    assert counts[0] == 15, "all 15 are launched on the first poll"
    assert world.done == 100
    assert counts[-1] == 0
    first_zero = counts.index(0, 1)
    assert all(c == 0 for c in counts[first_zero:]), "no flapping after the work is done"
    assert world.launched == 15, "no instance was launched twice for the same work"


def test_trickle_keeps_a_small_fleet():
    world = World(boot_s=2.0)
    arrivals = dict.fromkeys(range(0, 60, 3), 1)
    counts = run(world, Policy(), seconds=90, arrivals=arrivals)
    assert max(counts) <= 2
    assert world.done == 20
    assert counts[-1] == 0


def test_idle_launches_nothing():
    world = World()
    assert run(world, Policy(), seconds=30, arrivals={}) == [0] * 30
    assert world.launched == 0


def test_latency_mode_serves_a_burst_with_fewer_launches():
    backlog_world, latency_world = World(), World()
    run(backlog_world, Policy(), seconds=150, arrivals={0: 100})
    policy = Policy(mode="latency", acceptable_latency_s=20, seconds_per_image=0.5, boot_time_s=3)
    counts = run(latency_world, policy, seconds=150, arrivals={0: 100})
    assert latency_world.done == 100
    assert counts[-1] == 0
    assert latency_world.launched < backlog_world.launched
