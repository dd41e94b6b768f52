"""Every name derived from ``postgres.table`` fits PostgreSQL's 63-byte identifiers, at the longest table name allowed.

PostgreSQL cuts a longer identifier with only a NOTICE; two months' partitions would then share
one name. The settings cap the table name; this keeps the cap honest as derived names are added.
"""

from __future__ import annotations

import datetime as dt
import re

import pytest
from pydantic import ValidationError

from pipeline.settings import TABLE_NAME_MAX, Settings
from pipeline.table.convert import _names
from pipeline.table.partitions import Layout, create_statements, default_name, partition_name

ALL_INDEXABLE = ("user_id", "device_type", "masked_ip", "masked_device_id", "locale", "app_version")
_CREATED = re.compile(r"CREATE (?:UNIQUE )?(?:TABLE|INDEX) (\w+)")


def derived(table: str) -> list[str]:
    layout = Layout(indexes=ALL_INDEXABLE, today=dt.date(2026, 10, 1))
    new, progress, mirror = _names(table)
    names = [new, progress, f"{table}_unpartitioned", f"{table}_message_id_key",
             default_name(table), partition_name(table, dt.date(9999, 12, 1))]
    names += [f"{mirror}_{op}" for op in ("ins", "del", "upd")]  # its functions and triggers
    for statements in (create_statements(table, layout), create_statements(new, layout, named_for=table)):
        names += [m.group(1) for sql in statements for m in [_CREATED.match(sql)] if m]
    return names


def test_every_derived_name_fits_at_the_longest_table_name() -> None:
    table = "t" * TABLE_NAME_MAX
    names = derived(table)
    too_long = [n for n in names if len(n.encode()) > 63]
    assert not too_long
    months = [partition_name(table, dt.date(2026, m, 1)) for m in range(1, 13)]
    assert len(set(months)) == 12


def test_a_longer_table_name_is_one_clear_config_error() -> None:
    with pytest.raises(ValidationError, match=f"at most {TABLE_NAME_MAX} characters"):
        Settings.model_validate({"postgres": {"table": "t" * (TABLE_NAME_MAX + 1)}})
    assert Settings.model_validate({"postgres": {"table": "t" * TABLE_NAME_MAX}}).postgres.table == "t" * TABLE_NAME_MAX
