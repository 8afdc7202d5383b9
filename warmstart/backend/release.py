"""Who may release a warmstart model instance's engine. Pure: no Triton, no engine.

A release (the request parameter ``warmstart_release`` = true, see :mod:`warmstart.backend.request`) stops a
model that other clients may be using, and it arrives on Triton's inference port, which every client can reach.
So a release must also carry the server's repository API key, the secret that already guards load and
unload, as the string request parameter :data:`RELEASE_KEY_PARAMETER`. The backend learns the key from
:data:`KEY_ENV_VAR` in tritonserver's environment (the stubs inherit it): ``warmstart.triton.TritonServer``
sets it to ``TritonConfig.repository_api_key`` (``warmstart serve`` always has one) and removes it when the
server has no key. Without a key on the server, releases are refused: nothing there could tell the scheduler
from anyone else. The scheduler sends its ``servers[].repository_api_key`` (``warmstart.scheduler.upstream``);
where a release is refused it waits for the model's unload instead, as for a model of another backend.

Why the environment: the model config is readable by every client (Triton's model-config API) and a file
would have to be placed and protected beside every server; the environment of a process is readable only by
its user, who can read tritonserver's command line (with the same key) anyway.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Mapping

from warmstart.errors import WarmstartError

__all__ = ["KEY_ENV_VAR", "RELEASE_KEY_PARAMETER", "ReleaseRefused", "check_release_key", "release_key"]

KEY_ENV_VAR = (
    "WARMSTART_REPO_KEY"  # in tritonserver's environment: the repository key (`serve`'s default too)
)
RELEASE_KEY_PARAMETER = "warmstart_release_key"  # request parameter (string) of a release: that key


class ReleaseRefused(WarmstartError, PermissionError):
    """A release without the server's repository API key (or on a server that has none): INVALID_ARG."""


def release_key(environ: Mapping[str, str]) -> str | None:
    """The key releases must carry on this server, from ``environ`` (tritonserver's); None: no key set."""
    key = environ.get(KEY_ENV_VAR, "")
    return key or None


def check_release_key(parameters_json: str, expected: str | None) -> None:
    """Raise :class:`ReleaseRefused` unless the release's parameters (Triton's ``request.parameters()``
    JSON) carry ``expected`` as :data:`RELEASE_KEY_PARAMETER`. The comparison takes the same time whatever
    the mismatch (``hmac.compare_digest``)."""
    if expected is None:
        raise ReleaseRefused(
            f"release refused: this server has no repository API key ({KEY_ENV_VAR} is not set in tritonserver's "
            "environment; `warmstart serve` and warmstart.triton.TritonServer set it from the repository key), so "
            "no release can be authorized; unload the model through the repository API instead"
        )
    try:
        obj = json.loads(parameters_json) if parameters_json else {}
    except (ValueError, RecursionError):  # not a release request.py accepted; refused all the same
        obj = None
    sent = obj.get(RELEASE_KEY_PARAMETER) if isinstance(obj, dict) else None
    if not isinstance(sent, str) or not hmac.compare_digest(sent.encode(), expected.encode()):
        what = "a wrong key" if isinstance(sent, str) else "no key"
        raise ReleaseRefused(
            f"release refused ({what}): send the server's repository API key (the x-warmstart-repo-key of "
            f"`warmstart serve`) as the string request parameter {RELEASE_KEY_PARAMETER!r}"
        )
