"""Bad command lines get one clear line on stderr, never a traceback."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    ("arguments", "environment", "expected"),
    [
        (["--api-port", "abc"], {}, "invalid int value"),
        (["bogus"], {}, "invalid choice"),
        (["--namespace", "a b"], {}, "bad namespace"),
        (["--api-port", "0"], {}, "bad api_port"),
        (["api"], {"SHOAL_API_PORT": "x"}, "SHOAL_API_PORT='x' is not a whole number"),
        (["run"], {"SHOAL_MDNS": "perhaps"}, "SHOAL_MDNS='perhaps' is not true or false"),
    ],
)
def test_bad_input_is_one_line(
    arguments: list[str], environment: dict[str, str], expected: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "shoal", *arguments],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", **environment},
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]
    assert "Traceback" not in result.stderr


def test_help_lists_every_service() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "shoal", "--help"], capture_output=True, text=True, check=True
    )
    for service in ("run", "broker", "election", "master", "worker", "api"):
        assert service in result.stdout
