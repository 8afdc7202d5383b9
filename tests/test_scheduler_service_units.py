"""Process-free tests of the scheduler service's pieces: config, node-store parsing, request parsing,
the upstream request/response encoding, and the router's eviction path against a fake upstream."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb

from warmstart.scheduler.config import SchedulerConfig, SchedulerConfigError
from warmstart.scheduler.nodestore import NodeStoreError, parse_bandwidth, parse_inventory
from warmstart.scheduler.policy import choose_evictions, eviction_s, learn_release, record_arrival
from warmstart.scheduler.protocol import (
    BadRequest,
    chat_messages,
    coerce_sampling,
    sampling_from_json,
    status_of,
)
from warmstart.scheduler.router import ColdStartQueueFull, ColdStartTimeout, Router, _InstanceRT
from warmstart.scheduler.state import NodeBandwidth, Tier
from warmstart.scheduler.upstream import (
    RELEASE_KEY_PARAMETER,
    RELEASE_PARAMETER,
    RELEASED,
    GenerationRequest,
    ModelReleaseFailed,
    build_infer_request,
    build_release_request,
    parse_infer_response,
)

SERVER = {"name": "a", "grpc": "127.0.0.1:8001", "bandwidth": {"memory_bps": 1e10, "disk_bps": 1e9}}
MODEL = {"checkpoint": "s3://models/m"}


def test_config_defaults_bind_loopback_and_keep_cold_start_timeout_separate() -> None:
    cfg = SchedulerConfig.from_dict({"servers": [SERVER], "models": {"m": MODEL}})
    assert cfg.listen_http.startswith("127.0.0.1:") and cfg.listen_grpc.startswith("127.0.0.1:")
    assert cfg.cold_start_timeout_s != cfg.request_timeout_s
    assert cfg.models[0].to_spec().name == "m"


@pytest.mark.parametrize(
    "data",
    [
        {"servers": [SERVER], "bogus": 1},
        {"servers": [{**SERVER, "bogus": 1}]},
        {"servers": [{**SERVER, "bandwidth": {"memory_bps": 1e10, "disk_bps": 1e9, "pcie": 1}}]},
        {"models": {"m": {**MODEL, "bogus": 1}}},
        {"listen": {"http": "127.0.0.1:1", "admin": "x"}},
    ],
)
def test_config_rejects_unknown_keys_at_every_level(data: dict) -> None:
    with pytest.raises(SchedulerConfigError, match=r"unknown keys|listen"):
        SchedulerConfig.from_dict(data)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"migration": "false"}, "true or false"),
        ({"cold_start_queue": "ten"}, "must be a number"),
        ({"cold_start_timeout_s": -1}, ">= 0"),
        ({"models": {"../x": MODEL}}, "model names must match"),
        ({"models": {"m": {"engine": "torch"}}}, "'checkpoint' is required"),
        ({"servers": [{"name": "a", "grpc": "127.0.0.1:8001"}]}, "node_store URL"),
        ({"servers": [SERVER, SERVER]}, "unique"),
        ({"admin_token": "short"}, "16 characters"),
        ({"listen": {"http": "no-port"}}, "host:port"),
        ({"initial_release_s": -0.1}, "initial_release_s"),
        ({"initial_release_s": "fast"}, "initial_release_s"),
    ],
)
def test_config_rejects_invalid_values(data: dict, match: str) -> None:
    with pytest.raises(SchedulerConfigError, match=match):
        SchedulerConfig.from_dict(data)


def test_config_reads_yaml_and_admin_token_file(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("a-very-long-admin-token\n")
    path = tmp_path / "cluster.yaml"
    path.write_text(
        f"admin_token_file: {token}\nservers:\n  - name: a\n    grpc: 127.0.0.1:8001\n"
        "    node_store: http://127.0.0.1:7070\nmodels:\n  m:\n    checkpoint: s3://models/m\n"
    )
    cfg = SchedulerConfig.from_yaml(path)
    assert cfg.admin_token == "a-very-long-admin-token"
    assert "a-very-long" not in repr(cfg)


def test_inventory_keeps_the_best_tier_and_skips_invalid_names() -> None:
    tiers = parse_inventory(
        {
            "models": [
                {"name": "m", "tier": "disk"},
                {"name": "m", "tier": "memory"},
                {"name": "../x", "tier": "disk"},
            ]
        }
    )
    assert tiers == {"m": Tier.MEMORY}
    with pytest.raises(NodeStoreError):
        parse_inventory({"models": [{"name": "m", "tier": "tape"}]})
    with pytest.raises(NodeStoreError):
        parse_inventory([])


def test_bandwidth_not_yet_measured_falls_back_to_configured_figures() -> None:
    measured = parse_bandwidth({"memory_bps": 2e10, "disk_bps": 3e9, "remote_bps": None})
    assert measured.to_node_bandwidth(None) == NodeBandwidth(2e10, 3e9, None)
    assert measured.to_node_bandwidth(NodeBandwidth(1.0, 1.0, 5e8)) == NodeBandwidth(2e10, 3e9, 5e8)
    with pytest.raises(NodeStoreError):
        parse_bandwidth({"memory_bps": -1})
    with pytest.raises(NodeStoreError):
        parse_bandwidth({}).to_node_bandwidth(None)


def test_sampling_parsing_coerces_known_keys_and_rejects_unknown_ones_in_json() -> None:
    assert coerce_sampling({"max_tokens": "8", "temperature": 1, "stop": "x", "other": 1}, strict=False) == {
        "max_tokens": 8,
        "temperature": 1.0,
        "stop": ["x"],
    }
    with pytest.raises(BadRequest, match="unknown sampling parameter"):
        sampling_from_json('{"max_tokens": 4, "beam": 2}')
    with pytest.raises(BadRequest, match="not valid JSON"):
        sampling_from_json("{")
    with pytest.raises(BadRequest):
        coerce_sampling({"max_tokens": 1.5}, strict=True)
    assert chat_messages([{"role": "user", "content": "hi"}]) == ({"role": "user", "content": "hi"},)


def test_cold_start_rejections_map_to_503() -> None:
    assert status_of(ColdStartQueueFull("x")).http == 503
    assert status_of(ColdStartTimeout("x")).http == 503


def test_resume_request_carries_generated_ids_and_count() -> None:
    req = build_infer_request(
        GenerationRequest(
            "m", "r1", "hello", {"max_tokens": 4, "seed": 2}, prompt_ids=(1, 2), generated=(7, 8)
        )
    )
    names = [t.name for t in req.inputs]
    assert names == [
        "text_input",
        "stream",
        "exclude_input_in_output",
        "sampling_parameters",
        "input_ids",
        "num_generated",
    ]
    ids = np.frombuffer(req.raw_input_contents[names.index("input_ids")], dtype=np.int64)
    assert ids.tolist() == [1, 2, 7, 8]
    assert np.frombuffer(req.raw_input_contents[names.index("num_generated")], dtype=np.int64).tolist() == [2]
    sp = req.raw_input_contents[names.index("sampling_parameters")][4:]
    assert json.loads(sp) == {"max_tokens": 4, "seed": 2}
    assert req.parameters["triton_enable_empty_final_response"].bool_param


def test_response_parsing_reads_text_ids_reason_and_final_flag() -> None:
    r = pb.ModelInferResponse(model_name="m")
    for name, dtype, data in [
        ("text_output", "BYTES", len(b" w5").to_bytes(4, "little") + b" w5"),
        ("token_ids", "INT64", np.array([5], dtype=np.int64).tobytes()),
        ("finish_reason", "BYTES", (6).to_bytes(4, "little") + b"length"),
    ]:
        t = r.outputs.add()
        t.name, t.datatype = name, dtype
        r.raw_output_contents.append(data)
    r.parameters["triton_final_response"].bool_param = True
    chunk = parse_infer_response(r)
    assert (chunk.text, chunk.token_ids, chunk.finish_reason, chunk.final) == (" w5", (5,), "length", True)


def test_backend_accepts_the_schedulers_resume_form_text_prompt_plus_generated_ids() -> None:
    """The scheduler never tokenizes: it resumes with text_input + input_ids holding only generated ids."""
    from warmstart.backend.request import parse_request

    req = parse_request(
        {
            "text_input": np.array([b"hello"], dtype=np.object_),
            "stream": np.array([True]),
            "exclude_input_in_output": np.array([True]),
            "input_ids": np.array([7, 8], dtype=np.int64),
            "num_generated": np.array([2], dtype=np.int64),
        },
        json.dumps({"max_tokens": 4}),
    )
    assert req.prompt_ids is None and req.text == "hello" and req.generated_ids == (7, 8)


def test_release_request_carries_the_backends_release_flag_and_the_servers_key() -> None:
    from warmstart.backend import release as backend_release
    from warmstart.backend import request as backend

    assert (RELEASE_PARAMETER, RELEASED) == (backend.RELEASE_PARAMETER, backend.RELEASED)
    assert RELEASE_KEY_PARAMETER == backend_release.RELEASE_KEY_PARAMETER
    req = build_release_request("m", "warmstart-release-1")
    assert (req.model_name, req.id, list(req.inputs)) == ("m", "warmstart-release-1", [])
    assert dict(req.parameters) == {RELEASE_PARAMETER: pb.InferParameter(bool_param=True)}
    keyed = build_release_request("m", "warmstart-release-2", "repo-key-0123456789")
    assert dict(keyed.parameters) == {
        RELEASE_PARAMETER: pb.InferParameter(bool_param=True),
        RELEASE_KEY_PARAMETER: pb.InferParameter(string_param="repo-key-0123456789"),
    }
    # what Triton hands the backend as request.parameters()
    parameters = json.dumps({RELEASE_PARAMETER: True, RELEASE_KEY_PARAMETER: "repo-key-0123456789"})
    assert backend.is_release_request(parameters)
    backend_release.check_release_key(parameters, "repo-key-0123456789")


class _EvictionUpstream:
    """A server for the router's eviction path: the release answers (or fails) at once, the unload of the
    victim runs until the test lets it finish; every call is recorded in order."""

    def __init__(self, release_works: bool) -> None:
        self.release_works = release_works
        self.events: list[str] = []
        self.finish_unload = asyncio.Event()

    async def release(self, name: str, *, timeout_s: float) -> float:
        self.events.append(f"release {name}")
        if not self.release_works:
            raise ModelReleaseFailed(f"release {name}: not a warmstart model")
        return 0.01

    async def unload(self, name: str, *, wait_s: float = 30.0) -> None:
        self.events.append(f"unload {name}")
        await self.finish_unload.wait()
        self.events.append(f"unloaded {name}")

    async def load(self, name: str, config: Any, *, timeout_s: float) -> float:
        self.events.append(f"load {name}")
        return 0.1

    async def close(self) -> None:
        pass


@pytest.mark.parametrize(("prior", "expected"), [(None, 0.05), (0.2, 0.2), ("null", 1.0)])
def test_evictions_cost_the_expected_release_until_one_is_measured(prior: Any, expected: float) -> None:
    """A server starts with ``initial_release_s`` as its eviction cost (the warmstart backend releases in tens
    of ms), not the 1 s unload: pricing the first evictions at the unload sent loads to the remote while the
    model's memory-tier holder had only an idle model to evict. ``null`` expects releases to fail."""
    data: dict[str, Any] = {"servers": [SERVER], "models": {"m": MODEL}}
    if prior is not None:
        data["initial_release_s"] = None if prior == "null" else prior
    config = SchedulerConfig.from_dict(data)

    async def scenario() -> None:
        router = Router(config, renderer=lambda m: {})
        rt = router.servers["a"]
        assert rt.to_state(0.0, {}).eviction_s == pytest.approx(expected)
        # the moving average of measured releases starts from it
        assert eviction_s(learn_release(rt.costs, 0.01)) == pytest.approx(
            0.7 * expected + 0.3 * 0.01 if prior != "null" else 0.01
        )
        assert eviction_s(learn_release(rt.costs, None)) == pytest.approx(rt.costs.unload_s)
        await router.close()

    asyncio.run(scenario())


def test_router_counts_requests_per_model_into_the_snapshot_demand() -> None:
    """Every client request for a model counts in its recent request rate, which decays while none come;
    placement reads it from the snapshot (``ClusterSnapshot.demand``)."""
    config = SchedulerConfig.from_dict({"servers": [SERVER], "models": {"m": MODEL, "n": MODEL}})
    now = [100.0]

    async def scenario() -> None:
        router = Router(config, renderer=lambda m: {}, clock=lambda: now[0])
        assert router.snapshot().demand == {}
        for _ in range(3):
            router._count_request("m")
            now[0] += 1.0
        demand = router.snapshot().demand
        assert set(demand) == {"m"}
        assert demand["m"] == pytest.approx(
            sum(record_arrival(0.0, 0.0) * 0.5 ** (k / 60) for k in (1, 2, 3))
        )
        now[0] += 60.0
        assert router.snapshot().demand["m"] == pytest.approx(demand["m"] / 2)
        await router.remove_model("m")
        assert router.snapshot().demand == {}  # a removed model's count goes with it
        await router.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("release_works", [True, False], ids=["released", "release_fails"])
def test_eviction_loads_right_after_a_release_and_waits_for_the_unload_only_when_the_release_fails(
    release_works: bool,
) -> None:
    mib = 1 << 20
    config = SchedulerConfig.from_dict(
        {
            "servers": [{**SERVER, "memory_budget_bytes": mib}],
            "models": {n: {"checkpoint": f"s3://models/{n}", "size_bytes": mib} for n in ("old", "new")},
        }
    )

    async def scenario() -> None:
        fake = _EvictionUpstream(release_works)
        router = Router(config, renderer=lambda m: {}, upstream_factory=lambda server: fake)
        rt = router.servers["a"]
        rt.healthy = True
        rt.instances["old"] = _InstanceRT("old", mib, last_used_s=0.0)
        evictions = choose_evictions(rt.to_state(0.0, {}), mib, 0.0)
        assert evictions == ("old",)
        before = rt.costs
        router._start_load(rt, "new", evictions)
        load = rt.loads["new"].task
        assert load is not None
        for _ in range(20):  # let every task run as far as it can without the unload finishing
            await asyncio.sleep(0)
        if release_works:
            # the load ran while the victim's unload was still going; its memory no longer counted held
            assert load.done() and "new" in rt.instances
            assert fake.events == ["release old", "unload old", "load new"]
            assert rt.unloading == {"old": 0}
            assert rt.costs.release_s is not None and eviction_s(rt.costs) == rt.costs.release_s
            assert router.stats.releases == 1
        else:
            assert not load.done() and "new" not in rt.instances
            assert fake.events == ["release old", "unload old"]
            assert rt.unloading == {"old": mib}  # still held: the load waits
            assert rt.costs.release_s is None and eviction_s(rt.costs) == before.unload_s
            assert router.stats.releases == 0
        fake.finish_unload.set()
        await load
        for _ in range(20):
            await asyncio.sleep(0)
        assert rt.unloading == {} and "new" in rt.instances
        assert router.stats.unloads == 1 and router.stats.evictions == 1
        order = fake.events
        assert (order.index("load new") < order.index("unloaded old")) is release_works
        await router.close()

    asyncio.run(scenario())
