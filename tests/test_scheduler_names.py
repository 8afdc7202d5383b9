"""The model-name allow-list: every malicious shape is rejected with InvalidModelName."""

from __future__ import annotations

import pytest

from warmstart.errors import WarmstartError
from warmstart.scheduler import InvalidModelName, validate_model_name

VALID = {
    "plain": "smollm2",
    "dots_dashes_underscores": "Qwen2.5-0.5B_instruct",
    "digit_first": "0model",
    "max_length": "a" * 128,
    "single_char": "x",
}

INVALID = {
    "parent_traversal": ("../x", "'..'"),
    "double_dot_inside": ("a..b", "'..'"),
    "just_dots": ("..", "'..'"),
    "percent_encoded_traversal": ("%2e%2e%2f", "traversal"),
    "upper_percent_encoded_traversal": ("%2E%2E%2Fetc", "traversal"),
    "percent_encoded_slash": ("a%2fb", "traversal"),
    "percent_encoded_plain": ("a%41", "percent-encoding"),
    "absolute_path": ("/etc/passwd", "characters"),
    "windows_absolute": ("C:\\models\\x", "characters"),
    "slash": ("a/b", "characters"),
    "nul_byte": ("model\x00.txt", "NUL"),
    "too_long_200": ("a" * 200, "200 characters"),
    "length_129": ("a" * 129, "129 characters"),
    "empty": ("", "0 characters"),
    "leading_dot": (".hidden", "characters"),
    "leading_dash": ("-rf", "characters"),
    "space": ("a b", "characters"),
    "unicode_lookalike": ("mοdel", "characters"),
}


@pytest.mark.parametrize("name", VALID.values(), ids=VALID.keys())
def test_validate_model_name_returns_name_when_allowed(name: str) -> None:
    assert validate_model_name(name) == name


@pytest.mark.parametrize(("name", "why"), INVALID.values(), ids=INVALID.keys())
def test_validate_model_name_raises_invalid_when_malicious(name: str, why: str) -> None:
    with pytest.raises(InvalidModelName, match="must match") as info:
        validate_model_name(name)
    assert why in str(info.value)
    assert isinstance(info.value, WarmstartError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("value", [None, 42, b"model"], ids=["none", "int", "bytes"])
def test_validate_model_name_raises_invalid_when_not_a_string(value: object) -> None:
    with pytest.raises(InvalidModelName, match="not a string"):
        validate_model_name(value)
