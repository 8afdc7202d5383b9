"""The router's side of LoRA adapters without processes (scripted upstreams injected by ``upstream_factory``):
adapters in a model's config, a load carrying ``multi_lora.json``, requests selecting an adapter (``lora_name``,
an OpenAI model name ``<base>_lora_<adapter>`` or the adapter's own name), unknown adapters refused with the
names served, adapters added and removed at run time pushed to the loaded instances without a second load,
affinity to the instance that has the adapter resident, and the adapter travelling with a failover.

What crosses processes (Triton's file override, the backend's reload, token-exact resume) is tested against
real tritonservers in ``tests/test_scheduler_lora_triton.py``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

import pytest
from test_scheduler_streams import WORDS, ScriptedUpstream

from warmstart.scheduler.config import AdapterConfig, ModelConfig, SchedulerConfig, SchedulerConfigError
from warmstart.scheduler.errors import BadRequest, UnknownAdapterError, UnknownModelError
from warmstart.scheduler.router import (
    DuplicateAdapterError,
    Router,
    _InstanceRT,
    default_renderer,
    load_files,
)
from warmstart.scheduler.state import InMemoryClusterState

MIB = 1 << 20
BANDWIDTH = {"memory_bps": 1e10, "disk_bps": 1e9, "remote_bps": 1e8}


class LoraUpstream(ScriptedUpstream):
    """The scripted server of the stream tests (token i is ``WORDS[i]``, ``fail_after`` kills it), recording
    the loads (with their files) and adapter pushes it was sent."""

    def __init__(self, name: str, *, fail_after: int | None = None) -> None:
        super().__init__(name, fail_after=fail_after)
        self.loads: list[tuple[str, Mapping[str, Any], Mapping[str, bytes] | None]] = []
        self.pushes: list[dict[str, str]] = []

    async def load(
        self,
        name: str,
        config: Mapping[str, Any],
        *,
        timeout_s: float,
        files: Mapping[str, bytes] | None = None,
    ) -> float:
        self.loads.append((name, config, files))
        return 0.0

    async def set_adapters(
        self, name: str, adapters: Mapping[str, str], *, timeout_s: float
    ) -> dict[str, Any]:
        self.pushes.append(dict(adapters))
        return {"adapters": sorted(adapters), "added": [], "removed": []}


ADAPTERS = {"sql": "/adapters/sql", "chat": {"checkpoint": "s3://models/chat-lora", "size_bytes": 2 * MIB}}


def _router(
    upstreams: dict[str, LoraUpstream],
    warm: tuple[str, ...] = (),
    store: InMemoryClusterState | None = None,
    **extra: Any,
) -> Router:
    servers = [
        {"name": n, "grpc": f"127.0.0.1:{1 + i}", "bandwidth": BANDWIDTH} for i, n in enumerate(upstreams)
    ]
    models = {
        "base": {"checkpoint": "/models/base", "size_bytes": MIB, "adapters": ADAPTERS, "max_loras": 2},
        "plain": {"checkpoint": "/models/plain", "size_bytes": MIB},
        "other": {"checkpoint": "/models/other", "size_bytes": MIB, "adapters": {"chat": "/adapters/chat2"}},
    }
    config = SchedulerConfig.from_dict({"servers": servers, "models": models, **extra})
    router = Router(config, store=store, upstream_factory=lambda server: upstreams[server.name])
    for name in upstreams:
        router.servers[name].healthy = True
    for name in warm:
        router.servers[name].instances["base"] = _InstanceRT(
            "base", MIB, last_used_s=0.0, adapters_served=frozenset({"sql", "chat"})
        )
    return router


async def _run(router: Router, model: str, sampling: dict[str, Any], **kw: Any) -> list[int]:
    gen = router.new_generation(model, "hi", sampling, **kw)
    tokens: list[int] = []
    async for chunk in router.stream(gen):
        tokens.extend(chunk.token_ids)
    return tokens


def test_adapters_in_the_config_render_enable_lora_and_a_load_carries_multi_lora_json() -> None:
    model = ModelConfig.from_dict(
        "base", {"checkpoint": "/models/base", "adapters": ADAPTERS, "max_loras": 3, "max_lora_rank": 32}
    )
    params = default_renderer(model)["parameters"]
    assert params["enable_lora"] == {"string_value": "true"}
    assert params["max_loras"] == {"string_value": "3"} and params["max_lora_rank"] == {"string_value": "32"}
    files = load_files(model)
    assert files is not None
    assert json.loads(files["file:multi_lora.json"]) == {
        "chat": "s3://models/chat-lora",
        "sql": "/adapters/sql",
    }
    assert files["file:1/.warmstart"] == b""  # the version directory Triton's file override needs
    assert load_files(ModelConfig.from_dict("p", {"checkpoint": "/p"})) is None
    assert (
        "enable_lora" not in default_renderer(ModelConfig.from_dict("p", {"checkpoint": "/p"}))["parameters"]
    )
    assert ModelConfig.from_dict("base", model.to_dict()) == model  # deployments round-trip


@pytest.mark.parametrize(
    "adapters,needle",
    [
        ({"../x": "/a"}, "adapter name"),
        ({"a/b": "/a"}, "adapter name"),
        ({"a": ""}, "checkpoint"),
        ({"a": {"checkpoint": "/a", "rank": 8}}, "unknown keys rank"),
        ({"a": 7}, "checkpoint reference"),
        ([], "mapping"),
    ],
)
def test_bad_adapter_entries_are_refused_naming_what_is_wrong(adapters: Any, needle: str) -> None:
    with pytest.raises(SchedulerConfigError, match=needle):
        ModelConfig.from_dict("base", {"checkpoint": "/base", "adapters": adapters})


def test_adapters_need_the_rendered_config_and_the_separator_must_fit_a_model_name() -> None:
    with pytest.raises(SchedulerConfigError, match="triton_config"):
        ModelConfig.from_dict("b", {"checkpoint": "/b", "adapters": {}, "triton_config": {"backend": "x"}})
    with pytest.raises(SchedulerConfigError, match="lora_separator"):
        SchedulerConfig.from_dict({"lora_separator": "/"})


def test_the_load_of_a_lora_model_sends_its_adapters_and_the_generation_its_lora_name() -> None:
    async def main() -> None:
        up = LoraUpstream("s0")
        router = _router({"s0": up})
        assert await _run(router, "base", {"max_tokens": 3, "lora_name": "sql"}) == WORDS[:3]
        ((name, config, files),) = up.loads
        assert name == "base" and config["parameters"]["enable_lora"]["string_value"] == "true"
        assert files is not None and json.loads(files["file:multi_lora.json"])["sql"] == "/adapters/sql"
        assert up.requests[0].lora_name == "sql"
        assert "lora_name" not in up.requests[0].sampling  # sent beside the sampling parameters, once
        assert router.servers["s0"].instances["base"].adapters_served == frozenset({"sql", "chat"})
        assert router.servers["s0"].instances["base"].size_bytes == router.models["base"].memory_bytes
        await router.close()

    asyncio.run(main())


def test_unknown_adapters_are_refused_with_the_names_served() -> None:
    router = _router({"s0": LoraUpstream("s0")})
    with pytest.raises(UnknownAdapterError, match=r"no adapter 'fr'; it serves: chat, sql"):
        router.new_generation("base", "hi", {"lora_name": "fr"})
    with pytest.raises(BadRequest, match="serves no LoRA adapters"):
        router.new_generation("plain", "hi", {"lora_name": "sql"})
    with pytest.raises(BadRequest, match="selects adapter"):
        router.new_generation("base", "hi", {"lora_name": "chat"}, adapter="sql")


@pytest.mark.parametrize(
    "name,expected",
    [
        ("base", ("base", None)),
        ("base_lora_sql", ("base", "sql")),
        ("other_lora_chat", ("other", "chat")),
        ("sql", ("base", "sql")),  # an adapter's own name, served by one model only
    ],
)
def test_openai_model_names_select_a_base_and_an_adapter(name: str, expected: tuple[str, str | None]) -> None:
    assert _router({"s0": LoraUpstream("s0")}).resolve_model(name) == expected


def test_openai_model_names_that_select_nothing_say_why() -> None:
    router = _router({"s0": LoraUpstream("s0")})
    with pytest.raises(UnknownAdapterError, match="it serves: chat, sql"):
        router.resolve_model("base_lora_fr")
    with pytest.raises(BadRequest, match=r"several models \(base, other\).*base_lora_chat, other_lora_chat"):
        router.resolve_model("chat")
    with pytest.raises(UnknownModelError, match="no model named 'nothing'"):
        router.resolve_model("nothing")
    custom = _router({"s0": LoraUpstream("s0")}, lora_separator="--")
    assert custom.resolve_model("base--sql") == ("base", "sql")


def test_an_adapter_added_at_run_time_reaches_the_loaded_instances_without_a_second_load() -> None:
    async def main() -> None:
        ups = {"s0": LoraUpstream("s0"), "s1": LoraUpstream("s1")}
        router = _router(ups, warm=("s0", "s1"))
        with pytest.raises(UnknownAdapterError):
            router.new_generation("base", "hi", {"lora_name": "fr"})
        outcome = await router.add_adapter("base", AdapterConfig("fr", "s3://models/fr-lora"))
        assert outcome == {"s0": "ok", "s1": "ok"}
        for up in ups.values():
            assert up.pushes == [
                {"chat": "s3://models/chat-lora", "fr": "s3://models/fr-lora", "sql": "/adapters/sql"}
            ]
            assert up.loads == []  # the base was not loaded again
        assert await _run(router, "base", {"max_tokens": 2, "lora_name": "fr"}) == WORDS[:2]
        with pytest.raises(DuplicateAdapterError):
            await router.add_adapter("base", AdapterConfig("fr", "/elsewhere"))
        assert router.store.get_model("base").value.size_bytes == router.models["base"].memory_bytes
        await router.remove_adapter("base", "sql")
        assert ups["s0"].pushes[-1] == {"chat": "s3://models/chat-lora", "fr": "s3://models/fr-lora"}
        with pytest.raises(UnknownAdapterError, match="it serves: chat, fr"):
            router.new_generation("base", "hi", {"lora_name": "sql"})
        await router.close()

    asyncio.run(main())


def test_an_instance_not_known_to_list_the_adapter_gets_the_adapters_before_the_request() -> None:
    async def main() -> None:
        up = LoraUpstream("s0")
        router = _router({"s0": up})
        router.servers["s0"].instances["base"] = _InstanceRT("base", MIB, last_used_s=0.0)  # found loaded
        assert await _run(router, "base", {"max_tokens": 2, "lora_name": "chat"}) == WORDS[:2]
        assert up.pushes == [{"chat": "s3://models/chat-lora", "sql": "/adapters/sql"}]
        assert up.loads == [] and up.requests[0].lora_name == "chat"
        await router.close()

    asyncio.run(main())


def test_a_request_goes_to_the_warm_instance_where_its_adapter_is_resident(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger="warmstart.scheduler.router")

    async def main() -> None:
        ups = {"s0": LoraUpstream("s0"), "s1": LoraUpstream("s1")}
        router = _router(ups, warm=("s0", "s1"))
        router.servers["s1"].instances["base"].adapters_used["chat"] = 0.0
        for _ in range(3):
            await _run(router, "base", {"max_tokens": 2, "lora_name": "chat"})
        assert len(ups["s1"].requests) == 3 and not ups["s0"].requests
        assert "placement of base (adapter chat) for " in caplog.text
        assert "route to s1: 0.00 s" in caplog.text  # resident: nothing to load
        await _run(router, "base", {"max_tokens": 2})  # the base alone: fewest requests, name order
        assert len(ups["s0"].requests) == 1
        await router.close()

    asyncio.run(main())


def test_a_failed_over_adapter_generation_resumes_on_its_adapter_from_the_clients_tokens() -> None:
    async def main() -> None:
        ups = {"s0": LoraUpstream("s0", fail_after=3), "s1": LoraUpstream("s1")}
        router = _router(ups, warm=("s0", "s1"))
        router.servers["s0"].instances["base"].adapters_used["sql"] = 0.0  # goes to s0 first
        assert await _run(router, "base", {"max_tokens": 8, "lora_name": "sql"}) == WORDS[:8]
        (resumed,) = ups["s1"].requests
        assert resumed.lora_name == "sql" and resumed.generated == tuple(WORDS[:3])
        await router.close()

    asyncio.run(main())


def test_the_admin_view_lists_adapters_and_where_they_are_resident() -> None:
    async def main() -> None:
        router = _router({"s0": LoraUpstream("s0")}, warm=("s0",))
        await _run(router, "base", {"max_tokens": 1, "lora_name": "sql"})
        state = router.describe()
        assert state["adapters"] == {"base": ["chat", "sql"], "other": ["chat"]}
        inst = state["servers"]["s0"]["instances"]["base"]
        assert inst["adapters_served"] == ["chat", "sql"] and inst["adapters_resident"] == ["sql"]
        await router.close()

    asyncio.run(main())


def test_an_adapter_added_through_one_replica_is_served_and_pushed_by_the_other() -> None:
    async def main() -> None:
        store = InMemoryClusterState()  # the replicas' shared cluster state (etcd's conformant stand-in)
        ua, ub = LoraUpstream("s0"), LoraUpstream("s0")
        a = _router({"s0": ua}, warm=("s0",), store=store, etcd="http://127.0.0.1:2379")
        b = _router({"s0": ub}, warm=("s0",), store=store, etcd="http://127.0.0.1:2379")
        await a.add_adapter("base", AdapterConfig("fr", "s3://models/fr-lora"))
        await b._discovery_round()  # reads the deployments as its background loop does
        await asyncio.gather(*list(b._tasks))
        assert "fr" in (b.models["base"].adapters or {})
        assert ub.pushes == [
            {"chat": "s3://models/chat-lora", "fr": "s3://models/fr-lora", "sql": "/adapters/sql"}
        ]
        assert await _run(b, "base", {"max_tokens": 2, "lora_name": "fr"}) == WORDS[:2]
        await b._discovery_round()  # nothing changed: nothing pushed again
        assert len(ub.pushes) == 1
        await a.close()
        await b.close()

    asyncio.run(main())
