"""Who may release an engine (``warmstart.backend.release``): only a request carrying the server's key."""

from __future__ import annotations

import json

import pytest

from warmstart.backend.release import (
    KEY_ENV_VAR,
    RELEASE_KEY_PARAMETER,
    ReleaseRefused,
    check_release_key,
    release_key,
)

KEY = "repo-key-0123456789"


def _params(**extra: object) -> str:
    return json.dumps({"warmstart_release": True, **extra})


def test_a_release_carrying_the_servers_key_is_allowed() -> None:
    check_release_key(_params(**{RELEASE_KEY_PARAMETER: KEY}), KEY)


@pytest.mark.parametrize(
    ("parameters", "why"),
    [
        (_params(), "no key"),
        ("", "no key"),
        (_params(**{RELEASE_KEY_PARAMETER: 12345678}), "no key"),
        (_params(**{RELEASE_KEY_PARAMETER: KEY[:-1]}), "a wrong key"),
        (_params(**{RELEASE_KEY_PARAMETER: KEY + "x"}), "a wrong key"),
        (_params(**{RELEASE_KEY_PARAMETER: ""}), "a wrong key"),
        ("{not json", "no key"),
    ],
)
def test_a_release_without_the_key_is_refused_saying_what_to_send(parameters: str, why: str) -> None:
    with pytest.raises(ReleaseRefused, match=rf"release refused \({why}\).*'{RELEASE_KEY_PARAMETER}'"):
        check_release_key(parameters, KEY)


def test_a_server_without_a_key_refuses_every_release() -> None:
    with pytest.raises(ReleaseRefused, match=f"no repository API key.*{KEY_ENV_VAR}"):
        check_release_key(_params(**{RELEASE_KEY_PARAMETER: KEY}), None)


def test_the_key_comes_from_tritonservers_environment_and_empty_means_none() -> None:
    assert release_key({KEY_ENV_VAR: KEY}) == KEY
    assert release_key({KEY_ENV_VAR: ""}) is None
    assert release_key({}) is None
