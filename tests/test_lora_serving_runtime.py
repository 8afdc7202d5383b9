"""LoRA serving in the backend runtime without Triton: a registry of adapters on one loaded base.

Real generation on a tiny random Llama with two PEFT adapters converted by `warmstart convert`; greedy tokens
are compared with peft's own model. Covers: requests on two adapters and the bare base in one batch, LRU
reuse of a single slot, loads that never stall running requests, a corrupt adapter failing only its own
requests, unknown names and models without enable_lora, and run-time add/remove through multi_lora.json.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from backend_support import RecordingSink
from lora_support import LoraFixture, make_base_and_adapters, peft_greedy

from warmstart.backend.adapters import MultiLoraConfigError, read_multi_lora
from warmstart.backend.request import error_code, parse_request
from warmstart.backend.runtime import ModelLoadFailed, Runtime
from warmstart.engines.adapters import LoraNotEnabled, UnknownAdapter
from warmstart.tritonconfig import ModelSettings

pytestmark = pytest.mark.slow

PROMPT = [72, 101, 108, 108, 111, 32, 119]
N = 8


@pytest.fixture(scope="module")
def fx(tmp_path_factory: pytest.TempPathFactory) -> LoraFixture:
    return make_base_and_adapters(tmp_path_factory.mktemp("lora-rt"))


def _model_dir(root: Path, sources: dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "multi_lora.json").write_text(json.dumps(sources))
    return root


def _runtime(fx: LoraFixture, model_dir: Path, *, max_loras: int = 2, engine: str = "torch") -> Runtime:
    settings = ModelSettings(
        checkpoint=str(fx.base),
        engine=engine,
        max_batch=4,
        enable_lora=True,
        max_loras=max_loras,
        max_lora_rank=8,
    )
    return Runtime.load(settings, model_dir=model_dir, warmup=False)


def _request(lora: str | None, n: int = N, stream: bool = False) -> Any:
    params: dict[str, Any] = {"max_tokens": n}
    if lora is not None:
        params["lora_name"] = lora
    inputs = {
        "input_ids": np.asarray(PROMPT, np.int64),
        "stream": np.array([stream]),
        "sampling_parameters": np.array([json.dumps(params).encode()], dtype=np.object_),
    }
    return parse_request(inputs)


def _run(rt: Runtime, loras: list[str | None]) -> list[RecordingSink]:
    sinks = [RecordingSink() for _ in loras]
    for lora, sink in zip(loras, sinks, strict=True):
        rt.submit(_request(lora), sink)
    for sink in sinks:
        assert sink.done.wait(120) and sink.finals == 1
    return sinks


@pytest.fixture(scope="module")
def expected(fx: LoraFixture) -> dict[str | None, list[int]]:
    return {name: peft_greedy(fx.peft, name, PROMPT, N) for name in ("one", "two", None)}


@pytest.fixture(scope="module")
def rt(fx: LoraFixture, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    d = _model_dir(tmp_path_factory.mktemp("model"), {k: str(v) for k, v in fx.adapters.items()})
    runtime = _runtime(fx, d)
    yield runtime
    runtime.close()


def test_two_adapters_and_the_base_in_one_batch_match_peft(
    rt: Runtime, expected: dict[str | None, list[int]]
) -> None:
    steps_before = rt.generator.decode_steps
    sinks = _run(rt, ["one", None, "two", "one"])
    for lora, sink in zip(["one", None, "two", "one"], sinks, strict=True):
        assert sink.error is None, sink.error
        assert sink.ids == expected[lora], lora
    assert expected["one"] != expected[None] != expected["two"]  # the adapters change the tokens
    assert rt.generator.decode_steps - steps_before < 4 * (N - 1)  # decoded together, not one after another


def test_unknown_adapter_and_lora_without_enable_lora_are_invalid_arg(
    rt: Runtime, fx: LoraFixture, tmp_path: Path
) -> None:
    with pytest.raises(
        UnknownAdapter, match=r"unknown LoRA adapter 'nope'; this model serves: one, two"
    ) as e:
        rt.submit(_request("nope"), RecordingSink())
    assert error_code(e.value) == "INVALID_ARG"
    plain = Runtime.load(ModelSettings(checkpoint=str(fx.base), engine="torch", max_batch=2), warmup=False)
    try:
        with pytest.raises(LoraNotEnabled, match="enable_lora") as e2:
            plain.submit(_request("one"), RecordingSink())
        assert error_code(e2.value) == "INVALID_ARG"
        with pytest.raises(LoraNotEnabled):
            plain.reload_adapters()
    finally:
        plain.close()


def test_one_slot_serves_adapters_in_turn_least_recently_used_evicted(
    fx: LoraFixture, expected: dict[str | None, list[int]], tmp_path: Path
) -> None:
    runtime = _runtime(fx, _model_dir(tmp_path, {k: str(v) for k, v in fx.adapters.items()}), max_loras=1)
    try:
        for lora in ("one", "two", "one"):
            (sink,) = _run(runtime, [lora])
            assert sink.error is None and sink.ids == expected[lora], lora
            assert runtime.adapters is not None and runtime.adapters.resident() == {lora: 0}
        # two adapters at once with one slot: the second waits for the first to finish, both correct
        a, b, base = _run(runtime, ["two", "one", None])
        assert (a.ids, b.ids, base.ids) == (expected["two"], expected["one"], expected[None])
    finally:
        runtime.close()


def test_loading_an_adapter_does_not_stall_running_requests(
    fx: LoraFixture, expected: dict[str | None, list[int]], tmp_path: Path
) -> None:
    runtime = _runtime(fx, _model_dir(tmp_path, {k: str(v) for k, v in fx.adapters.items()}))
    assert runtime.adapters is not None
    slow_open = runtime.adapters.open_adapter
    loading = threading.Event()

    def open_slowly(ref: str) -> Any:
        loading.set()
        time.sleep(0.6)
        return slow_open(ref)

    runtime.adapters.open_adapter = open_slowly
    stamps: list[float] = []

    class Stamped(RecordingSink):
        def send(self, text: str, token_ids: Any, finish_reason: Any, **kw: Any) -> None:
            stamps.extend(time.monotonic() for _ in token_ids)
            super().send(text, token_ids, finish_reason, **kw)

    try:
        long = Stamped()
        runtime.submit(_request(None, n=400, stream=True), long)
        while not stamps:
            time.sleep(0.005)
        lora = RecordingSink()
        runtime.submit(_request("two"), lora)
        assert loading.wait(10)
        t0 = time.monotonic()
        assert lora.done.wait(60) and lora.error is None and lora.ids == expected["two"]
        during = [t for t in stamps if t0 + 0.05 < t < t0 + 0.5]
        assert len(during) >= 10  # the base request kept decoding while the adapter loaded
        assert long.done.wait(120) and long.error is None
    finally:
        runtime.close()


def test_a_corrupt_adapter_fails_only_its_own_requests_and_is_retried(
    fx: LoraFixture, expected: dict[str | None, list[int]], tmp_path: Path
) -> None:
    corrupt = tmp_path / "corrupt-lora"
    corrupt.mkdir()
    (corrupt / "index.json").write_text('{"format": "warmstart", "format_version": 1, "tensors": [')
    sources = {"one": str(fx.adapters["one"]), "bad": str(corrupt), "base-as-adapter": str(fx.base)}
    runtime = _runtime(fx, _model_dir(tmp_path / "m", sources))
    try:
        bad, good, base, not_adapter = _run(runtime, ["bad", "one", None, "base-as-adapter"])
        assert bad.error is not None and bad.error[0] == "INTERNAL"
        assert "LoRA adapter 'bad'" in bad.error[1] and "multi_lora.json" in bad.error[1]
        assert not_adapter.error is not None and "NotAnAdapter" in not_adapter.error[1]
        assert good.error is None and good.ids == expected["one"]
        assert base.error is None and base.ids == expected[None]
        assert runtime.adapters is not None
        loads = runtime.adapters.loads
        (again,) = _run(runtime, ["bad"])
        assert again.error is not None and runtime.adapters.loads == loads + 1  # tried again, failed again
    finally:
        runtime.close()


def test_adapters_are_added_and_removed_at_run_time_without_reloading_the_base(
    fx: LoraFixture, expected: dict[str | None, list[int]], tmp_path: Path
) -> None:
    d = _model_dir(tmp_path, {"one": str(fx.adapters["one"])})
    runtime = _runtime(fx, d)
    engine = runtime.engine
    try:
        with pytest.raises(UnknownAdapter):
            runtime.submit(_request("two"), RecordingSink())
        _model_dir(d, {"one": str(fx.adapters["one"]), "two": str(fx.adapters["two"])})
        sink = RecordingSink()
        runtime.control("reload_adapters", sink)
        answer = json.loads(sink.texts[0])
        assert sink.finish_reason == "adapters_reloaded"
        assert answer["added"] == ["two"] and answer["adapters"] == ["one", "two"]
        a, b = _run(runtime, ["two", "one"])
        assert (a.ids, b.ids) == (expected["two"], expected["one"])
        _model_dir(d, {"two": str(fx.adapters["two"])})  # remove "one"
        assert runtime.reload_adapters()["removed"] == ["one"]
        with pytest.raises(UnknownAdapter):
            runtime.submit(_request("one"), RecordingSink())
        (c,) = _run(runtime, ["two"])
        assert c.ids == expected["two"]
        assert runtime.engine is engine  # the same base engine throughout
        assert runtime.adapters is not None and "one" not in runtime.adapters.resident()
        (d / "multi_lora.json").write_text("[1, 2]")
        broken = RecordingSink()
        runtime.control("reload_adapters", broken)
        assert (
            broken.error is not None and broken.error[0] == "INVALID_ARG" and "JSON object" in broken.error[1]
        )
        assert runtime.adapters.names() == ["two"]  # unchanged
    finally:
        runtime.close()


def test_multi_lora_json_is_validated(tmp_path: Path, fx: LoraFixture) -> None:
    assert read_multi_lora(tmp_path) == {}  # no file: no adapter yet (add them at run time)
    (tmp_path / "multi_lora.json").write_text('{"ok": "a/b", "": "x"}')
    with pytest.raises(MultiLoraConfigError, match="adapter name"):
        read_multi_lora(tmp_path)
    (tmp_path / "multi_lora.json").write_text('{"ok": 3}')
    with pytest.raises(MultiLoraConfigError, match="checkpoint reference"):
        read_multi_lora(tmp_path)
    with pytest.raises(ModelLoadFailed, match=r"multi_lora\.json"):
        _runtime(fx, tmp_path)


def test_adapters_that_do_not_fit_fail_only_their_own_requests(
    fx: LoraFixture, expected: dict[str | None, list[int]], tmp_path: Path
) -> None:
    # max_lora_rank 4: adapter two (rank 8) cannot be served, adapter one (rank 4) can
    settings = ModelSettings(
        checkpoint=str(fx.base), engine="torch", max_batch=4, enable_lora=True, max_loras=2, max_lora_rank=4
    )
    sources = {k: str(v) for k, v in fx.adapters.items()}
    runtime = Runtime.load(settings, model_dir=_model_dir(tmp_path, sources), warmup=False)
    try:
        two, one = _run(runtime, ["two", "one"])
        assert (
            two.error is not None
            and "AdapterRankTooLarge" in two.error[1]
            and "max_lora_rank" in two.error[1]
        )
        assert one.error is None and one.ids == expected["one"]
        # a base the adapter was not trained for (fewer layers, other sizes): IncompatibleBase at load
        assert runtime.adapters is not None
        runtime.adapters.base_config = {**runtime.adapters.base_config, "intermediate_size": 96}
        runtime.adapters.set_sources({"one-again": str(fx.adapters["one"])})
        (mismatch,) = _run(runtime, ["one-again"])
        assert mismatch.error is not None and "IncompatibleBase" in mismatch.error[1]
        assert (
            "gate_proj maps 64 -> 128 features in the adapter but 64 -> 96 in the base" in mismatch.error[1]
        )
    finally:
        runtime.close()


def test_an_adapter_request_resumes_token_exactly_from_its_generated_ids(
    rt: Runtime, expected: dict[str | None, list[int]]
) -> None:
    done = expected["two"][:3]
    inputs = {
        "input_ids": np.asarray([*PROMPT, *done], np.int64),
        "num_generated": np.array([len(done)], np.int64),
        "sampling_parameters": np.array(
            [json.dumps({"max_tokens": N, "lora_name": "two"}).encode()], dtype=np.object_
        ),
    }
    sink = RecordingSink()
    rt.submit(parse_request(inputs), sink)
    assert sink.done.wait(60) and sink.error is None
    assert sink.ids == expected["two"][3:]  # the rest of the same generation, on the same adapter


def test_an_installed_adapter_keeps_no_view_of_its_checkpoint_while_its_lease_lives(fx: LoraFixture) -> None:
    """The slot holds a copy: the prepared views (and with them the checkpoint's mapping, which pins the
    node store's entry against eviction) go at install, not when the request's lease is freed."""
    import weakref

    from warmstart.engines.adapters import AdapterRegistry, PreparedAdapter
    from warmstart.format.lora import read_adapter

    config = json.loads((fx.base / "config.json").read_text())
    engine = Runtime.load(
        ModelSettings(
            checkpoint=str(fx.base), engine="torch", max_batch=2, enable_lora=True, max_lora_rank=8
        ),
        warmup=False,
    )
    try:
        eng: Any = engine.engine
        installed: list[weakref.ref[PreparedAdapter]] = []
        real_install = eng.install_adapter

        class Recording:
            args, max_loras, max_lora_rank = eng.args, eng.max_loras, eng.max_lora_rank

            def install_adapter(self, slot: int, prepared: PreparedAdapter) -> None:
                installed.append(weakref.ref(prepared))
                real_install(slot, prepared)

            def remove_adapter(self, slot: int) -> None:
                eng.remove_adapter(slot)

        settled = threading.Event()
        registry = AdapterRegistry(
            Recording(),  # type: ignore[arg-type]
            config,
            {"one": str(fx.adapters["one"])},
            open_adapter=read_adapter,
            on_change=settled.set,
        )
        lease = registry.acquire("one")  # held, as a running request holds it
        assert settled.wait(60) and lease.error is None
        registry.service()
        assert lease.slot is not None and len(installed) == 1
        assert installed[0]() is None  # nothing holds the prepared adapter any more
        registry.release(lease)
        registry.close()
    finally:
        engine.close()
