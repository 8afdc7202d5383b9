"""Owner of one tritonserver process: configuration, backend directory, environment, start, health, stop.

The server binary comes from the ``nvidia-pytriton`` wheel (tritonserver 2.51). Everything that makes it
work here is in this module and nowhere else (see ``notes/triton.md``):

* ``PATH`` starts with the directory of ``sys.executable`` (the Python stub finds its interpreter, and so
  the venv's site-packages, through ``python3`` on ``PATH``); ``LD_LIBRARY_PATH`` holds
  ``nvidia_pytriton.libs`` and the interpreter's ``LIBDIR`` (so the stub loads the matching libpython).
* The wheel's Python backend has no stub beside it; :func:`prepare_backend_dir` assembles a backend
  directory (``python/`` plus the warmstart Python-based backend when present).
* Explicit model control, auto-complete off, ``--strict-readiness=false``, a small exit timeout, and every
  listener bound to 127.0.0.1 unless told otherwise.
* Stop is SIGTERM, wait, SIGKILL by PID and a sweep of the process group (the stubs).

Model names are validated here before they reach Triton: tritonserver 2.51 loads ``../outside`` from
outside its repository when asked to.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from warmstart import errors as _errors
from warmstart._process import ManagedProcess, free_ports, tail
from warmstart.devices import CPU_HINT
from warmstart.errors import InvalidModelName
from warmstart.names import validate_model_name

logger = logging.getLogger(__name__)

__all__ = [
    "InvalidModelName",
    "ModelLoadError",
    "TritonConfig",
    "TritonConfigError",
    "TritonError",
    "TritonNotFound",
    "TritonServer",
    "TritonStartError",
    "prepare_backend_dir",
    "triton_env",
    "validate_model_name",
]

_HEADER_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")  # gRPC metadata keys must be lowercase
_API_KEY_PATTERN = re.compile(r"^[\x21-\x7e]{8,256}$")  # printable ASCII, no spaces
_STUB_PYTHON = "3.11"
GRPC_RESTRICTED_PREFIX = "triton-grpc-protocol-"  # Triton prefixes restricted-protocol gRPC metadata keys
# Triton APIs that need the repository key when one is set: model control, and what changes the server or reads
# or writes its memory. Inference, health and metadata stay open for plain clients; model-config and statistics
# are read-only (the metrics port publishes the statistics anyway) and read by perf_analyzer and tritonclient.
RESTRICTED_APIS = ("model-repository", "shared-memory", "logging", "trace")
RELEASE_KEY_ENV = "WARMSTART_REPO_KEY"  # = warmstart.backend.release.KEY_ENV_VAR (no backend import here)
_WARMSTART_BACKEND_SRC = Path(__file__).resolve().parent / "backend" / "triton_backend"


class TritonError(_errors.WarmstartError, RuntimeError):
    """Base class of the errors of this module."""


class TritonNotFound(TritonError, FileNotFoundError):
    """The tritonserver binary or the Python backend files are missing."""


class TritonConfigError(TritonError, ValueError):
    """A :class:`TritonConfig` field is invalid."""


class TritonStartError(TritonError):
    """tritonserver exited or did not become live in time; the message ends with its log tail."""


class ModelLoadError(TritonError):
    """Triton refused or failed to load or unload a model; the message carries Triton's reason."""


def _pytriton_root() -> Path:
    try:
        import pytriton
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise TritonNotFound(
            "nvidia-pytriton is not installed; install the 'triton' extra: pip install 'warmstart[triton]'"
        ) from e
    return Path(pytriton.__file__).resolve().parent / "tritonserver"


def tritonserver_binary() -> Path:
    """Path of the tritonserver executable shipped in the nvidia-pytriton wheel."""
    path = _pytriton_root() / "bin" / "tritonserver"
    if not path.is_file() or not os.access(path, os.X_OK):
        raise TritonNotFound(f"tritonserver not found at {path}; reinstall nvidia-pytriton==0.7.0")
    return path


def _pytriton_libs() -> Path:
    root = _pytriton_root().parent.parent / "nvidia_pytriton.libs"
    if not root.is_dir():
        raise TritonNotFound(f"{root} is missing; reinstall nvidia-pytriton==0.7.0")
    return root


def prepare_backend_dir(dest: Path | str) -> Path:
    """Assemble a Triton backend directory under ``dest`` and return ``dest``.

    ``dest/python/`` receives ``libtriton_python.so``, ``triton_python_backend_utils.py`` and the Python
    3.11 stub from the pytriton wheel; ``dest/warmstart/`` receives the warmstart Python-based backend
    (``warmstart/backend/triton_backend/``) when that directory exists. Existing files are replaced.
    """
    dest = Path(dest)
    root = _pytriton_root()
    sources = {
        "libtriton_python.so": root / "backends" / "python" / "libtriton_python.so",
        "triton_python_backend_utils.py": root / "backends" / "python" / "triton_python_backend_utils.py",
        "triton_python_backend_stub": root
        / "python_backend_stubs"
        / _STUB_PYTHON
        / "triton_python_backend_stub",
    }
    for name, src in sources.items():
        if not src.is_file():
            raise TritonNotFound(f"{name} not found at {src}; reinstall nvidia-pytriton==0.7.0")
    python_dir = dest / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for name, src in sources.items():
        shutil.copy2(src, python_dir / name)
    if _WARMSTART_BACKEND_SRC.is_dir():
        target = dest / "warmstart"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(_WARMSTART_BACKEND_SRC, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def triton_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment tritonserver needs: venv bin first on PATH, pytriton libs and LIBDIR on LD_LIBRARY_PATH."""
    env = dict(os.environ if base is None else base)
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in [venv_bin, env.get("PATH", "")] if p)
    libs = [str(_pytriton_libs())]
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        libs.append(str(libdir))
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
    return env


def _check_port(name: str, port: int) -> None:
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise TritonConfigError(f"{name} must be an int in 0..65535 (0 picks a free port), got {port!r}")


@dataclass(frozen=True)
class TritonConfig:
    """Everything that decides a tritonserver command line. Rendered to argv by :meth:`to_argv` only.

    ``log_file`` is where the server's stdout and stderr go (not a Triton flag); ``None`` lets
    :class:`TritonServer` choose a file in its work directory. ``repository_api_key`` restricts the
    model-repository API (load, unload, index) and the shared-memory, logging and trace APIs
    (:data:`RESTRICTED_APIS`) over HTTP and gRPC to requests carrying the header
    ``repository_api_header: <key>``; it appears in the server's argv, so treat the host as trusted. The
    server's environment carries it too (``WARMSTART_REPO_KEY``): the warmstart backend accepts engine
    releases only with it (``warmstart.backend.release``).
    """

    model_repositories: tuple[Path, ...]
    backend_directory: Path | None = None
    http_port: int = 0
    grpc_port: int = 0
    metrics_port: int = 0
    bind_address: str = "127.0.0.1"
    disable_auto_complete_config: bool = True
    strict_readiness: bool = False
    exit_timeout_secs: int = 3
    load_models: tuple[str, ...] = ()
    repository_api_key: str | None = field(default=None, repr=False)
    repository_api_header: str = "x-warmstart-repo-key"
    log_file: Path | None = None
    verbose: bool = False

    def __post_init__(self) -> None:
        repos = self.model_repositories
        if isinstance(repos, (str, Path)):
            repos = (repos,)
        repos = tuple(Path(r) for r in repos)
        if not repos:
            raise TritonConfigError("model_repositories must name at least one directory")
        object.__setattr__(self, "model_repositories", repos)
        if self.backend_directory is not None:
            object.__setattr__(self, "backend_directory", Path(self.backend_directory))
        if self.log_file is not None:
            object.__setattr__(self, "log_file", Path(self.log_file))
        object.__setattr__(self, "load_models", tuple(self.load_models))
        for name in ("http_port", "grpc_port", "metrics_port"):
            _check_port(name, getattr(self, name))
        nonzero = [p for p in (self.http_port, self.grpc_port, self.metrics_port) if p]
        if len(nonzero) != len(set(nonzero)):
            raise TritonConfigError("http_port, grpc_port and metrics_port must differ")
        if not re.fullmatch(r"[0-9A-Za-z.:\-]+", self.bind_address):
            raise TritonConfigError(
                f"bind_address must be an IP address or host name, got {self.bind_address!r}"
            )
        for name in ("disable_auto_complete_config", "strict_readiness", "verbose"):
            if not isinstance(getattr(self, name), bool):
                raise TritonConfigError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if (
            not isinstance(self.exit_timeout_secs, int)
            or isinstance(self.exit_timeout_secs, bool)
            or not 0 <= self.exit_timeout_secs <= 3600
        ):
            raise TritonConfigError(
                f"exit_timeout_secs must be an int in 0..3600, got {self.exit_timeout_secs!r}"
            )
        for m in self.load_models:
            try:
                validate_model_name(m)
            except InvalidModelName as e:
                raise TritonConfigError(f"load_models: {e}") from e
        if not _HEADER_PATTERN.fullmatch(self.repository_api_header):
            raise TritonConfigError(
                f"repository_api_header must be lowercase [a-z0-9-], got {self.repository_api_header!r}"
            )
        if self.repository_api_key is not None and not _API_KEY_PATTERN.fullmatch(self.repository_api_key):
            raise TritonConfigError(
                "repository_api_key must be 8-256 printable ASCII characters without spaces"
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TritonConfig:
        """Build from a plain mapping; unknown keys are rejected."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TritonConfigError(f"unknown TritonConfig keys: {', '.join(unknown)}")
        values = dict(data)
        for key in ("model_repositories", "load_models"):
            if key in values and not isinstance(values[key], (str, Path)):
                values[key] = tuple(values[key])
        return cls(**values)

    def to_argv(self, binary: Path | str) -> list[str]:
        """The tritonserver command line. Every port must be concrete (non-zero) and a backend dir set."""
        if not (self.http_port and self.grpc_port and self.metrics_port):
            raise TritonConfigError(
                "to_argv needs concrete ports; TritonServer.start() resolves 0 to free ports"
            )
        if self.backend_directory is None:
            raise TritonConfigError("to_argv needs backend_directory; TritonServer.start() prepares one")
        argv = [str(binary)]
        argv += [f"--model-repository={r.resolve()}" for r in self.model_repositories]
        argv += [
            f"--backend-directory={self.backend_directory.resolve()}",
            "--model-control-mode=explicit",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            f"--http-address={self.bind_address}",
            f"--grpc-address={self.bind_address}",
            f"--metrics-address={self.bind_address}",
            f"--strict-readiness={str(self.strict_readiness).lower()}",
            f"--exit-timeout-secs={self.exit_timeout_secs}",
        ]
        if self.disable_auto_complete_config:
            argv.append("--disable-auto-complete-config")
        argv += [f"--load-model={m}" for m in self.load_models]
        if self.repository_api_key is not None:
            apis = ",".join(RESTRICTED_APIS)
            restriction = f"{apis}:{self.repository_api_header}={self.repository_api_key}"
            argv += [f"--http-restricted-api={restriction}", f"--grpc-restricted-protocol={restriction}"]
        if self.verbose:
            argv.append("--log-verbose=1")
        return argv


_SHM_REGION = re.compile(r"triton_[a-z0-9_]*backend_shm_region_[0-9a-f-]{36}")


def _stub_shm_regions(server_pid: int | None) -> list[str]:
    """The ``/dev/shm`` regions of the Python stubs that ``server_pid`` runs now (argv[2] of each stub)."""
    if server_pid is None:
        return []
    names = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != server_pid:
                continue
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if len(argv) > 2 and argv[0].endswith(b"triton_python_backend_stub"):
            name = argv[2].decode(errors="replace")
            if _SHM_REGION.fullmatch(name):
                names.append(name)
    return names


def _orphaned_stub_regions(shm: Path = Path("/dev/shm"), *, min_age_s: float = 30.0) -> list[Path]:
    """This user's Python-backend regions under ``shm`` that none of this user's processes maps: their
    server and stub are both gone (a server killed by SIGKILL leaves its stubs' regions behind). Regions
    younger than ``min_age_s`` are left alone: a live server maps its new region a moment after creating it."""
    uid = os.getuid()
    now = time.time()
    try:
        candidates = [
            p
            for p in shm.iterdir()
            if _SHM_REGION.fullmatch(p.name)
            and (st := p.stat()).st_uid == uid
            and now - st.st_mtime >= min_age_s
        ]
    except OSError:
        return []
    if not candidates:
        return []
    mapped: set[str] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            maps = (proc / "maps").read_text()
        except OSError:  # exited meanwhile, or another user's process: not one of ours
            continue
        mapped.update(m.group(0) for m in _SHM_REGION.finditer(maps))
    return [p for p in candidates if p.name not in mapped]


def _redact(argv: Sequence[str], secret: str | None) -> str:
    text = " ".join(argv)
    return text.replace(secret, "***") if secret else text


class TritonServer:
    """One tritonserver process. Use as a context manager, or call :meth:`start` and :meth:`stop`.

    ``start()`` resolves ports given as 0 to free ones, prepares a backend directory in the work
    directory when the config names none, spawns the server and waits until ``/v2/health/live`` answers.
    ``stop()`` is idempotent and leaves no process behind.
    """

    def __init__(
        self,
        config: TritonConfig,
        *,
        workdir: Path | str | None = None,
        env: Mapping[str, str] | None = None,
        engine_host: bool = True,
    ) -> None:
        """``env``: variables set for this server (and its backend stubs) on top of this process's environment,
        e.g. ``{"WARMSTART_STORE": store_url}``; this process's own environment is never changed.

        ``engine_host``: also run a :class:`warmstart.backend.host.EngineHost` beside the server (started
        first, stopped last) so that ``warmstart`` models start in a forked, torch-ready process instead of
        importing torch in a fresh stub; ``False`` runs engines inside the stubs.
        """
        self._extra_env = dict(env or {})
        self._want_engine_host = engine_host
        self._engine_host: Any = None
        self._engine_host_dir: Path | None = None
        self._requested = config
        self._config = config
        self._workdir = Path(workdir) if workdir is not None else None
        self._owns_workdir = False
        self._process: ManagedProcess | None = None

    # -- properties ------------------------------------------------------------------------------------
    @property
    def config(self) -> TritonConfig:
        """The effective config (concrete ports and backend directory once started)."""
        return self._config

    @property
    def pid(self) -> int | None:
        """PID of the tritonserver process, None before start."""
        return self._process.pid if self._process is not None else None

    @property
    def engine_host_pid(self) -> int | None:
        """PID of the engine host beside the server, None without one or before start."""
        return self._engine_host.pid if self._engine_host is not None else None

    @property
    def http_url(self) -> str:
        """``host:port`` of the HTTP endpoint (tritonclient.http style, no scheme)."""
        return f"{self._config.bind_address}:{self._require_port(self._config.http_port)}"

    @property
    def grpc_url(self) -> str:
        """``host:port`` of the gRPC endpoint."""
        return f"{self._config.bind_address}:{self._require_port(self._config.grpc_port)}"

    @property
    def metrics_url(self) -> str:
        """Full URL of the Prometheus metrics page."""
        return f"http://{self._config.bind_address}:{self._require_port(self._config.metrics_port)}/metrics"

    @property
    def repository_headers(self) -> dict[str, str]:
        """HTTP headers that authorize repository-API calls (empty when no key is configured)."""
        key = self._config.repository_api_key
        return {self._config.repository_api_header: key} if key else {}

    @property
    def repository_grpc_headers(self) -> dict[str, str]:
        """gRPC metadata that authorizes repository-API calls.

        Triton 2.51 expects the restricted-protocol header under ``triton-grpc-protocol-<header>`` over
        gRPC, but as ``<header>`` itself over HTTP.
        """
        key = self._config.repository_api_key
        return {GRPC_RESTRICTED_PREFIX + self._config.repository_api_header: key} if key else {}

    @property
    def log_path(self) -> Path | None:
        """File receiving the server's stdout and stderr, once started."""
        return self._process.log_path if self._process is not None else None

    @staticmethod
    def _require_port(port: int) -> int:
        if not port:
            raise TritonError("the server has not been started; its ports are not known yet")
        return port

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> Self:
        """Spawn tritonserver and wait until it is live. Raises TritonStartError (with log tail) on failure.

        A server that exits during start-up is started once more before the error is raised."""
        if self._process is not None:
            raise TritonError("this TritonServer was already started; create a new one")
        binary = tritonserver_binary()
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="warmstart-triton-"))
            self._owns_workdir = True
        self._workdir.mkdir(parents=True, exist_ok=True)
        cfg = self._requested
        for repo in cfg.model_repositories:
            if not repo.is_dir():
                raise TritonStartError(f"model repository {repo} is not a directory")
        ports = iter(free_ports(3, cfg.bind_address if cfg.bind_address != "0.0.0.0" else "127.0.0.1"))
        updates: dict[str, Any] = {
            name: next(ports)
            for name in ("http_port", "grpc_port", "metrics_port")
            if getattr(cfg, name) == 0
        }
        if cfg.backend_directory is None:
            updates["backend_directory"] = prepare_backend_dir(self._workdir / "backends")
        log_file = cfg.log_file or self._workdir / "tritonserver.log"
        updates["log_file"] = log_file
        self._config = dataclasses.replace(cfg, **updates)
        argv = self._config.to_argv(binary)
        env = triton_env({**os.environ, **self._extra_env})
        # the warmstart backend accepts releases only with this key (warmstart.backend.release); none: no releases
        env.pop(RELEASE_KEY_ENV, None)
        if self._config.repository_api_key is not None:
            env[RELEASE_KEY_ENV] = self._config.repository_api_key
        if self._want_engine_host:
            from warmstart.backend.host import ENV_VAR, EngineHost

            # a short private directory: a Unix socket path holds at most 107 bytes
            self._engine_host_dir = Path(tempfile.mkdtemp(prefix="wseh-"))
            self._engine_host = EngineHost(
                self._engine_host_dir / "engines.sock", env=env, log_path=self._workdir / "engine-host.log"
            )
            env[ENV_VAR] = str(self._engine_host.socket_path)
        logger.info("starting tritonserver: %s", _redact(argv, self._config.repository_api_key))
        self._process = ManagedProcess(argv, env=env, log_path=log_file, cwd=self._workdir)
        try:
            if self._engine_host is not None:
                self._engine_host.start()  # it imports torch while tritonserver starts
            self._process.start()
            try:
                self.wait_ready(timeout)
            except TritonStartError as first:
                if self._process.is_alive():
                    raise  # alive but not live in time: a second try would wait as long again
                # It died while starting. tritonserver 2.51 rarely does on a sound config (seen once in the
                # suite: gRPC's poller "epoll_wait error: Bad file descriptor" as it came up): once more.
                logger.warning("tritonserver exited during start-up; starting it once more. %s", first)
                self._process = ManagedProcess(argv, env=env, log_path=log_file, cwd=self._workdir)
                self._process.start()
                self.wait_ready(timeout)
            if self._engine_host is not None:
                self._engine_host.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Poll ``/v2/health/live`` until it answers 200; raise TritonStartError if it exits or times out."""
        if self._process is None:
            raise TritonError("start() the server first")
        url = f"http://{self.http_url}/v2/health/live"
        deadline = time.monotonic() + timeout
        t0 = time.monotonic()
        while True:
            if not self._process.is_alive():
                raise TritonStartError(
                    f"tritonserver (pid {self.pid}) exited during start-up; log tail:\n{tail(self.log_path)}"
                )
            try:
                with urllib.request.urlopen(url, timeout=1.0) as resp:
                    if resp.status == 200:
                        logger.info("tritonserver pid %s live after %.2f s", self.pid, time.monotonic() - t0)
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() >= deadline:
                raise TritonStartError(
                    f"tritonserver (pid {self.pid}) not live after {timeout:.1f} s; log tail:\n"
                    f"{tail(self.log_path)}"
                )
            time.sleep(0.05)

    def is_alive(self) -> bool:
        """True while the tritonserver process runs."""
        return self._process is not None and self._process.is_alive()

    def logs(self) -> str:
        """Everything the server wrote to stdout/stderr so far."""
        return self._process.logs() if self._process is not None else ""

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait ``timeout``, SIGKILL by PID, then sweep its process group. Idempotent."""
        rc = None
        if self._process is not None:
            regions = _stub_shm_regions(self._process.pid) if self._process.is_alive() else []
            rc = self._process.stop(timeout)
            logger.info("tritonserver pid %s stopped (rc=%s)", self._process.pid, rc)
            leftovers = [Path("/dev/shm") / name for name in regions]  # stubs killed at the exit timeout
            leftovers += _orphaned_stub_regions()  # stubs of a server that was killed (SIGKILL) earlier
            for path in dict.fromkeys(leftovers):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    logger.info("removed the leftover shared-memory region %s", path.name)
        if self._engine_host is not None:  # after the server: its stubs close their engine processes first
            self._engine_host.stop(timeout)
            self._engine_host = None
        if self._engine_host_dir is not None:
            shutil.rmtree(self._engine_host_dir, ignore_errors=True)
            self._engine_host_dir = None
        if self._owns_workdir and self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._owns_workdir = False
        return rc

    def __enter__(self) -> Self:
        if self._process is None:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- repository API --------------------------------------------------------------------------------
    def _grpc_client(self) -> Any:
        import tritonclient.grpc as grpcclient

        return grpcclient.InferenceServerClient(self.grpc_url)

    def load_model(
        self, name: str, config: Mapping[str, Any] | None = None, files: Mapping[str, bytes] | None = None
    ) -> None:
        """Load (or reload) ``name`` and block until it is ready or failed; no client-side timeout.

        ``config`` is a ModelConfig as a JSON-able dict (required for file-override loads); ``files`` maps
        ``"file:<relative path>"`` to bytes. Raises InvalidModelName before contacting Triton, and
        ModelLoadError with Triton's reason when the load fails.
        """
        from tritonclient.utils import InferenceServerException

        validate_model_name(name)
        client = self._grpc_client()
        t0 = time.monotonic()
        try:
            client.load_model(
                name,
                headers=self.repository_grpc_headers or None,
                config=json.dumps(config) if config is not None else None,
                files=dict(files) if files is not None else None,
                client_timeout=None,
            )
        except InferenceServerException as e:
            reason = str(e.message())
            if "KIND_GPU but no GPUs are available" in reason:  # Triton's own check, before the backend's
                reason = (
                    f"{reason.rstrip().rstrip(';')} (no CUDA device is visible to tritonserver); {CPU_HINT}"
                )
            raise ModelLoadError(f"loading model {name!r} failed: {reason}") from e
        finally:
            client.close()
        logger.info("model %s loaded in %.2f s", name, time.monotonic() - t0)

    def repository_index(self) -> list[dict[str, Any]]:
        """Triton's repository index: ``[{"name", "version", "state", "reason"}, ...]``."""
        from tritonclient.utils import InferenceServerException

        client = self._grpc_client()
        try:
            index = client.get_model_repository_index(
                headers=self.repository_grpc_headers or None, as_json=True
            )
        except InferenceServerException as e:
            raise ModelLoadError(f"reading the repository index failed: {e.message()}") from e
        finally:
            client.close()
        return list(index.get("models", []))

    def unload_model(self, name: str, wait: bool = True, timeout: float = 60.0) -> None:
        """Unload ``name``. Triton unloads asynchronously; with ``wait`` poll the index until UNAVAILABLE.

        A model loaded by file override is not in the index; then the wait ends when it is not ready.
        """
        from tritonclient.utils import InferenceServerException

        validate_model_name(name)
        client = self._grpc_client()
        try:
            client.unload_model(name, headers=self.repository_grpc_headers or None, client_timeout=None)
            if not wait:
                return
            deadline = time.monotonic() + timeout
            t0 = time.monotonic()
            while True:
                index = client.get_model_repository_index(
                    headers=self.repository_grpc_headers or None, as_json=True
                )
                states = [m.get("state", "") for m in index.get("models", []) if m.get("name") == name]
                if states and all(s == "UNAVAILABLE" for s in states):
                    break
                if not states and not client.is_model_ready(name):
                    break
                if time.monotonic() >= deadline:
                    raise ModelLoadError(
                        f"model {name!r} still {states or 'ready'} {timeout:.0f} s after unload"
                    )
                time.sleep(0.05)
            logger.info("model %s unloaded in %.2f s", name, time.monotonic() - t0)
        except InferenceServerException as e:
            raise ModelLoadError(f"unloading model {name!r} failed: {e.message()}") from e
        finally:
            client.close()
