"""The ``policy`` config switch: the router places with warmstart's rule or a benchmark baseline."""

from __future__ import annotations

import pytest

from warmstart.scheduler.config import SchedulerConfig, SchedulerConfigError
from warmstart.scheduler.policy import Action
from warmstart.scheduler.router import placement_rule
from warmstart.scheduler.state import (
    ClusterSnapshot,
    ModelSpec,
    NodeBandwidth,
    PendingLoad,
    ServerState,
    Tier,
)

GB = 10**9
BW = NodeBandwidth(memory_bps=20e9, disk_bps=2e9, remote_bps=0.5e9)


def _snapshot() -> ClusterSnapshot:
    # s1 holds m in memory but has a 30 s load queue; s2 holds it on disk and is idle; s3 has nothing
    servers = (
        ServerState("s1", True, 8 * GB, BW, 1.0, load_queue=(PendingLoad("a", GB, 30.0),),
                    store_tiers={"m": Tier.MEMORY}),
        ServerState("s2", True, 8 * GB, BW, 1.0, store_tiers={"m": Tier.DISK}),
        ServerState("s3", True, 8 * GB, BW, 1.0),
    )  # fmt: skip
    models = {n: ModelSpec(n, f"s3://models/{n}", 2 * GB, "torch", 60.0, 4) for n in ("m", "a")}
    return ClusterSnapshot(servers=servers, models=models, now=0.0)


@pytest.mark.parametrize(
    ("policy", "server"), [("warmstart", "s2"), ("serverlessllm", "s1")], ids=["warmstart", "sllm"]
)
def test_policy_selects_the_placement_rule(policy: str, server: str) -> None:
    decision = placement_rule(SchedulerConfig(policy=policy))(_snapshot(), "m")
    assert (decision.action, decision.server) == (Action.LOAD, server)


def test_random_policy_is_seeded_and_reproducible() -> None:
    def picks(seed: int) -> list[str | None]:
        rule = placement_rule(SchedulerConfig(policy="random", policy_seed=seed))
        return [rule(_snapshot(), "m").server for _ in range(20)]

    assert picks(3) == picks(3)
    assert set(picks(3)) == {"s1", "s2", "s3"}


def test_default_policy_is_warmstart_and_unknown_ones_are_rejected() -> None:
    assert SchedulerConfig().policy == "warmstart"
    assert SchedulerConfig.from_dict({"policy": "random", "policy_seed": 7}).policy_seed == 7
    with pytest.raises(SchedulerConfigError, match="policy must be one of"):
        SchedulerConfig.from_dict({"policy": "round-robin"})
    with pytest.raises(SchedulerConfigError, match="policy_seed"):
        SchedulerConfig.from_dict({"policy_seed": 1.5})
