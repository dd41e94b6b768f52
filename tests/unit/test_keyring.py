"""Key ring loading (env, file), active key choice, one-line errors without secrets; audit records."""

from __future__ import annotations

import logging
import os
import stat
import uuid
from collections import Counter
from pathlib import Path

import orjson
import pytest

from pipeline.keyring import KeyRingError, entries, load_masker_sync, parse_entry
from pipeline.pii.unmask import AuditError, Refused, audit, looks_like_token, unmask_all, unmask_rows
from pipeline.settings import Settings, load_settings
from stages.masking import Masker, generate_key

ROOT = Path(__file__).resolve().parents[2]
K1, K2, K3 = generate_key("k1"), generate_key("k2"), generate_key("k3")


def secret_of(key: str) -> str:
    return key.split(":", 1)[1]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No PIPELINE_* variable of the caller's shell may leak into these settings."""
    for var in [v for v in os.environ if v.startswith("PIPELINE_")]:
        monkeypatch.delenv(var)
    return monkeypatch


def ring(**masking: str) -> Masker:
    return load_masker_sync(Settings(masking=masking))


def test_env_key_and_keys(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("PIPELINE_MASKING__KEY", K2.encode())
    clean_env.setenv("PIPELINE_MASKING__KEYS", f"{K1.encode()}, {K3.encode()}")
    m = load_masker_sync(load_settings(ROOT / "config.toml"))
    assert m.key_ids == ["k2", "k1", "k3"] and m.active == "k2"
    assert m.unmask(Masker([K1]).mask("1.2.3.4")) == "1.2.3.4"
    assert m.mask("x").startswith("k2.")


def test_active_key_id_and_default_first(clean_env: pytest.MonkeyPatch) -> None:
    assert ring(keys=f"{K1.encode()},{K2.encode()}").active == "k1"
    assert ring(keys=f"{K1.encode()},{K2.encode()}", active_key_id="k2").active == "k2"
    clean_env.setenv("PIPELINE_MASKING__KEYS", K1.encode())
    clean_env.setenv("PIPELINE_MASKING__ACTIVE_KEY_ID", "k1")
    assert load_masker_sync(load_settings(ROOT / "config.toml")).active == "k1"


def test_unknown_active_key_id() -> None:
    with pytest.raises(KeyRingError, match=r"'k9' \(masking.active_key_id\) is not in the key ring \(k1\)"):
        ring(key=K1.encode(), active_key_id="k9")


def test_key_file(tmp_path: Path) -> None:
    path = tmp_path / "ring"
    path.write_text(f"# old key, kept to unmask and rekey\n{K1.encode()}\n\n{K2.encode()}  # current\n")
    path.chmod(0o600)
    m = ring(key_file=str(path), active_key_id="k2")
    assert m.key_ids == ["k1", "k2"] and m.active == "k2"
    assert ring(key=K3.encode(), key_file=str(path)).key_ids == ["k3", "k1", "k2"]


def test_key_file_errors_name_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(KeyRingError, match="masking.key_file .*missing.* not found"):
        ring(key_file=str(tmp_path / "missing"))
    path = tmp_path / "ring"
    path.write_text(f"# ring\n{K1.encode()}\n\nk2:!!notbase64\n")
    with pytest.raises(KeyRingError, match=r"'k2' in masking.key_file .* line 4 is not valid base64"):
        ring(key_file=str(path))


def test_world_readable_key_file_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "ring"
    path.write_text(K1.encode() + "\n")
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="pipeline.keyring"):
        ring(key_file=str(path))
    assert "chmod 600" in caplog.text and secret_of(K1.encode()) not in caplog.text


def test_duplicate_ids() -> None:
    assert ring(key=K1.encode(), keys=K1.encode()).key_ids == ["k1"]  # the same key twice is fine
    other = generate_key("k1").encode()
    with pytest.raises(KeyRingError, match=r"'k1' is defined twice with different keys \(masking.key .* and masking.keys"):
        ring(key=K1.encode(), keys=other)


@pytest.mark.parametrize("bad", [
    secret_of(K1.encode()),  # a bare secret, no id: must not be echoed
    "bad id!:" + secret_of(K1.encode()),
    "k1:" + secret_of(K1.encode())[:10],  # too short
], ids=["bare-secret", "bad-id", "too-short"])  # fixed ids: the keys are random, and xdist workers must agree
def test_malformed_entries_do_not_echo_secrets(bad: str) -> None:
    with pytest.raises(KeyRingError) as err:
        ring(keys=bad)
    msg = str(err.value)
    assert "\n" not in msg and "masking.keys" in msg
    assert secret_of(K1.encode())[:10] not in msg


def test_no_key_at_all() -> None:
    with pytest.raises(KeyRingError, match="no masking key"):
        ring()
    assert not Settings().masking.configured
    assert Settings(masking={"key_file": "x"}).masking.configured


def test_wrapped_entries() -> None:
    e = parse_entry("kw:kms:AQIDBA==", "test")
    assert e.wrapped == b"\x01\x02\x03\x04" and e.secret is None
    assert parse_entry("kw:AQIDBA", "test", wrapped=True).wrapped == b"\x01\x02\x03\x04"
    assert "AQID" not in repr(e)
    with pytest.raises(KeyRingError, match="'kw' in masking.key .* is KMS-wrapped"):
        ring(key="kw:kms:AQIDBA==")
    assert [x.key_id for x in entries(Settings(masking={"kms_wrapped_keys": "a:kms:AQ==, b:AQ=="}))] == ["a", "b"]


def test_secrets_stay_out_of_repr(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("PIPELINE_MASKING__KEYS", K1.encode())
    s = load_settings(ROOT / "config.toml")
    assert secret_of(K1.encode()) not in repr(s)


# --- recovery -------------------------------------------------------------------------


M = Masker([K2, K1], active="k2")


def test_token_shape() -> None:
    assert looks_like_token(M.mask("1.2.3.4")) and looks_like_token(Masker([K1]).mask("a"))
    for not_token in ["2.3.0", "0.96", str(uuid.uuid4()), "3f2a" * 16, "", None, 5, "k1.short"]:
        assert not looks_like_token(not_token), not_token


def test_unmask_all_and_key_ids() -> None:
    old, new = Masker([K1]).mask("593-47-5928"), M.mask("1.2.3.4")
    originals, ids = unmask_all(M, [old, new, new])
    assert originals == ["593-47-5928", "1.2.3.4", "1.2.3.4"] and ids == Counter({"k2": 2, "k1": 1})


def test_unmask_refuses_missing_key_before_anything() -> None:
    k3 = Masker([K3]).mask("1.2.3.4")
    with pytest.raises(Refused, match=r"no key with id 'k3' in the key ring \(it holds k2, k1\)") as err:
        unmask_all(M, [M.mask("a"), k3])
    assert err.value.missing_key_id == "k3"
    with pytest.raises(Refused, match="value #2 is not a masked value"):
        unmask_all(M, [M.mask("a"), "1.2.3.4"])


def test_unmask_rows_leaves_legacy_hashes_and_other_columns() -> None:
    rows = [{"user_id": "u", "app_version": "2.3.0", "masked_ip": M.mask("1.2.3.4"), "masked_device_id": "ab" * 32},
            {"user_id": "v", "app_version": "0.96", "masked_ip": None, "masked_device_id": M.mask("d")}]
    out, ids, n = unmask_rows(M, rows)
    assert out[0] == {"user_id": "u", "app_version": "2.3.0", "masked_ip": "1.2.3.4", "masked_device_id": "ab" * 32}
    assert out[1]["masked_device_id"] == "d" and out[1]["masked_ip"] is None
    assert n == 2 and ids == Counter({"k2": 2})


def test_audit_record_has_ids_and_count_but_no_value(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    token = M.mask("10.0.0.1")
    log_path = tmp_path / "audit.jsonl"
    settings = Settings(masking={"key": K2.encode(), "audit_log": str(log_path)})
    with caplog.at_level(logging.INFO, logger="pipeline.audit"):
        audit(settings, mode="args", key_ids=Counter({"k2": 1}), count=1, outcome="ok")
        audit(settings, mode="stdin", key_ids=None, count=3, outcome="refused", missing_key_id="k9")
    lines = [orjson.loads(line) for line in log_path.read_text().splitlines()]
    assert [r["mode"] for r in lines] == ["args", "stdin"]
    first = lines[0]
    assert first["key_ids"] == {"k2": 1} and first["count"] == 1 and first["outcome"] == "ok"
    assert first["at"].endswith("Z") and first["user"]
    assert lines[1]["missing_key_id"] == "k9" and lines[1]["outcome"] == "refused"
    assert stat.S_IMODE(log_path.stat().st_mode) == 0o600
    text = log_path.read_text() + caplog.text
    assert "10.0.0.1" not in text and token not in text and token.split(".", 1)[1] not in text
    assert [r.name for r in caplog.records] == ["pipeline.audit", "pipeline.audit"]


def test_unwritable_audit_log_fails_closed(tmp_path: Path) -> None:
    settings = Settings(masking={"key": K2.encode(), "audit_log": str(tmp_path / "no" / "such" / "dir.log")})
    with pytest.raises(AuditError, match="nothing unmasked"):
        audit(settings, mode="args", key_ids=Counter(), count=1, outcome="ok")
