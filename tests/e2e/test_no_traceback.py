"""Every command, given broken configuration or dependencies, ends in ONE ``error: ...`` line.

Each case runs ``python -m pipeline`` as a subprocess in an empty folder with only ``PIPELINE_*``
variables, and checks: a non-zero exit (2 for configuration, 1 for the rest), exactly one line
starting with ``error:`` on stderr, no traceback anywhere and no password. Unreachable services are
closed ports on 127.0.0.1 (connection refused at once), so no case waits for a timeout.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from stages.masking import generate_key
from tests.helpers import REPO

KEY = generate_key("nt").encode()
SECRET = "Hunter2pw"
CLOSED = "127.0.0.1:1"  # nothing listens on port 1: connection refused, not a timeout
DEAD_SQS = {"PIPELINE_SQS__ENDPOINT_URL": f"http://{CLOSED}", "PIPELINE_SQS__QUEUE_URL": f"http://{CLOSED}/000000000000/q"}
DEAD_PG = {"PIPELINE_POSTGRES__DSN": f"postgresql://u:{SECRET}@{CLOSED}/db"}
CONFIGURED = {**DEAD_SQS, **DEAD_PG, "PIPELINE_MASKING__KEY": KEY}

COMMANDS = {
    "run": ["run", "--until-empty"],
    "migrate": ["migrate"],
    "check": ["check"],
    "keygen": ["keygen", "--kms-key-id", "arn:aws:kms:us-east-1:000000000000:key/x"],
    "unmask": ["unmask", "zz.AAAA"],
    "rekey": ["rekey", "--dry-run"],
    "show": ["show"],
    "redrive": ["redrive"],
    "loadgen": ["loadgen", "--count", "1"],
    "bench": ["bench", "--count", "100", "--rounds", "1", "--no-latency"],
}

BAD_CONFIG = {  # name: (env, what the error line says); each is exit code 2 for every command
    "region": ({"PIPELINE_SQS__REGION": "not a region!"}, "sqs.region"),
    "empty-region": ({"PIPELINE_SQS__REGION": ""}, "sqs.region"),
    "endpoint-no-scheme": ({"PIPELINE_SQS__ENDPOINT_URL": "localhost:4566"}, "sqs.endpoint_url"),
    "endpoint-bad-scheme": ({"PIPELINE_SQS__ENDPOINT_URL": "ht!tp://x"}, "sqs.endpoint_url"),
    "unknown-key": ({"PIPELINE_SQS__QUEUEURL": "x"}, "PIPELINE_SQS__QUEUEURL"),
    "bad-value": ({"PIPELINE_SQS__RECEIVERS": "many"}, "sqs.receivers"),
    "queue-not-url": ({"PIPELINE_SQS__QUEUE_URL": "login-queue"}, "sqs.queue_url"),
    "kms-endpoint": ({"PIPELINE_MASKING__KMS_ENDPOINT_URL": "kms"}, "masking.kms_endpoint_url"),
    "dsn-key-value": ({"PIPELINE_POSTGRES__DSN": f"host=x password={SECRET}"}, "postgres.dsn"),
    "dsn-scheme": ({"PIPELINE_POSTGRES__DSN": f"mysql://u:{SECRET}@h/db"}, "postgres.dsn"),
    "dsn-port": ({"PIPELINE_POSTGRES__DSN": f"postgresql://u:{SECRET}@h:port/db"}, "postgres.dsn"),
    "dsn-slash": ({"PIPELINE_POSTGRES__DSN": f"postgresql://u:ab/{SECRET}@h:5432/db"}, "percent-encod"),
    "config-file": ({"PIPELINE_CONFIG": "nope.toml"}, "not found"),
}


def cli(tmp: Path, args: list[str], env: dict[str, str], timeout: float = 90) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PIPELINE_", "PG"))}
    base["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=tmp, env={**base, **env},
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def one_error_line(out: subprocess.CompletedProcess, code: int, expected: str) -> str:
    text = out.stdout + out.stderr
    assert "Traceback" not in text, text[-3000:]
    assert SECRET not in text and SECRET[:5] not in text, text[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out.stderr[-3000:]
    assert out.returncode == code, (out.returncode, errors[0])
    assert expected in errors[0], errors[0]
    return errors[0]


# Every command meets every kind of bad value at least once (configuration is validated in one place,
# load_settings, before any command runs, so the full cross product would only repeat itself).
PAIRS = list(zip(sorted(COMMANDS) * 2, sorted(BAD_CONFIG)))


@pytest.mark.parametrize(("command", "case"), PAIRS)
def test_bad_configuration_is_one_line_exit_2(tmp_path: Path, command: str, case: str) -> None:
    env, expected = BAD_CONFIG[case]
    one_error_line(cli(tmp_path, COMMANDS[command], {**CONFIGURED, **env}), 2, expected)


UNREACHABLE = {  # command: (extra env, what the error line says)
    "run": ({}, f"SQS endpoint http://{CLOSED} is unreachable"),
    "migrate": ({}, f"is unreachable: connection refused (tried {CLOSED})"),
    "rekey": ({}, f"is unreachable: connection refused (tried {CLOSED})"),
    "show": ({}, f"is unreachable: connection refused (tried {CLOSED})"),
    "unmask": ({}, "not a masked value"),  # refused before any connection
    "redrive": ({}, f"http://{CLOSED}"),
    "loadgen": ({}, f"http://{CLOSED}"),
    "bench": ({}, CLOSED),  # either dependency may be tried first
    "keygen": ({"PIPELINE_MASKING__KMS_ENDPOINT_URL": f"http://{CLOSED}"}, f"KMS endpoint http://{CLOSED} is unreachable"),
}


@pytest.mark.parametrize("command", sorted(UNREACHABLE))
def test_unreachable_dependencies_are_one_line_exit_1(tmp_path: Path, command: str) -> None:
    env, expected = UNREACHABLE[command]
    one_error_line(cli(tmp_path, COMMANDS[command], {**CONFIGURED, **env}), 1, expected)


def test_check_reports_unreachable_dependencies_as_findings(tmp_path: Path) -> None:
    out = cli(tmp_path, ["check"], CONFIGURED)
    assert out.returncode == 1 and "Traceback" not in out.stdout + out.stderr
    assert not [line for line in out.stderr.splitlines() if line.startswith("error:")]
    failed = [line for line in out.stdout.splitlines() if line.startswith("FAIL")]
    assert len(failed) == 2 and f"tried {CLOSED}" in failed[1], out.stdout
    assert SECRET not in out.stdout + out.stderr


@pytest.mark.parametrize("password", ["p@ss/w", "pa@ss"])
def test_a_misread_password_names_the_host_the_driver_tried(tmp_path: Path, password: str) -> None:
    """``u:p@ss/w@host`` reaches the driver as host ``ss``: say so, without printing ``ss``."""
    secret = password + SECRET
    env = {"PIPELINE_POSTGRES__DSN": f"postgresql://u:{secret}@{CLOSED}/db"}
    out = cli(tmp_path, ["migrate"], env)
    line = one_error_line(out, 1, "percent-encoding")
    assert "tried ***" in line and "ss" not in line.replace("address", "").replace("pass", ""), line


def test_missing_masking_key_and_bad_key(tmp_path: Path) -> None:
    one_error_line(cli(tmp_path, ["run"], {**CONFIGURED, "PIPELINE_MASKING__KEY": ""}), 1, "no masking key")
    one_error_line(cli(tmp_path, ["rekey"], {**CONFIGURED, "PIPELINE_MASKING__KEY": "k1:not base64!"}), 1, "k1")
    one_error_line(cli(tmp_path, ["unmask", "x"], {**CONFIGURED, "PIPELINE_MASKING__KEY": "nonsense"}), 1, "masking key")


@pytest.mark.parametrize("command", ["show", "rekey", "unmask-query"])
def test_missing_table(tmp_path: Path, pg_dsn: str, command: str) -> None:
    args = ["unmask", "--query", "SELECT * FROM user_logins"] if command == "unmask-query" else COMMANDS[command]
    env = {**CONFIGURED, "PIPELINE_POSTGRES__DSN": pg_dsn}
    one_error_line(cli(tmp_path, args, env), 1, "user_logins")


def test_show_on_a_fresh_database(tmp_path: Path, pg_dsn: str) -> None:
    out = cli(tmp_path, ["show"], {"PIPELINE_POSTGRES__DSN": pg_dsn})
    line = one_error_line(out, 1, "table user_logins does not exist yet")
    head, _, tail = line.partition("; run `")  # the hint names the interpreter that ran us
    assert head == "error: table user_logins does not exist yet", line
    assert tail.endswith("-m pipeline migrate` or `run`"), line


@pytest.mark.parametrize("command", ["run", "redrive", "loadgen"])
def test_missing_queue(tmp_path: Path, localstack, pg_dsn: str, command: str) -> None:  # type: ignore[no-untyped-def]
    missing = f"{localstack.endpoint}/000000000000/no-such-queue-nt"
    env = {**CONFIGURED, "PIPELINE_SQS__ENDPOINT_URL": localstack.endpoint, "PIPELINE_SQS__QUEUE_URL": missing,
           "PIPELINE_SQS__CREATE_DLQ": "false", "PIPELINE_POSTGRES__DSN": pg_dsn}
    one_error_line(cli(tmp_path, COMMANDS[command], env), 1, "no-such-queue-nt")
