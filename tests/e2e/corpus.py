"""A hostile corpus: malformed and odd message bodies, each with what must become of it.

``BAD`` bodies must be dead-lettered with the given rule (and, where given, that exact reason);
``ODD`` bodies are strange but valid and must be stored exactly once, with the given values.
Every kind is one case; the e2e test mixes them into valid traffic.

SQS itself refuses bodies with characters outside XML 1.0 (raw NUL, other C0 controls but
tab/newline/CR, lone surrogates): ``UNSENDABLE`` lists those, to prove they cannot arrive.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson

from pipeline.sample import WRONG_TYPE

BASE = {
    "user_id": "c0rpus-0000",
    "app_version": "2.3.0",
    "device_type": "android",
    "ip": "203.0.113.77",
    "locale": "RU",
    "device_id": "812-55-1029",
}
SQL = "'; DROP TABLE user_logins; --"
BIG = 200_000  # characters: a body still fits SQS's 256 KiB


def ev(_drop: tuple[str, ...] = (), **over: object) -> str:
    """BASE with fields overridden (or dropped), as a JSON body."""
    event = {k: v for k, v in {**BASE, **over}.items() if k not in _drop}
    return orjson.dumps(event).decode()


def deep(n: int) -> str:
    return "[" * n + "]" * n


@dataclass(frozen=True)
class Bad:
    name: str
    body: str
    rule: str
    reason: str | None = None


@dataclass(frozen=True)
class Odd:
    name: str
    body: str
    stored: dict = field(default_factory=dict)  # column -> value (``ip``/``device_id``: the unmasked value)


_valid = ev()[:-1]  # a valid body without its closing brace, to splice raw JSON into

BAD: list[Bad] = [
    # Not JSON.
    Bad("not_json", "not json at all", "body.json", "body: not valid JSON"),
    Bad("whitespace_only", "   \n\t ", "body.json"),
    Bad("truncated", ev()[:-10], "body.json"),
    Bad("trailing_garbage", ev() + " x", "body.json"),
    Bad("two_documents", ev() + ev(), "body.json"),
    Bad("single_quotes", "{'user_id': 'u-1', 'ip': '1.2.3.4'}", "body.json"),
    Bad("trailing_comma", _valid + ",}", "body.json"),
    Bad("nan", _valid + ', "score": NaN}', "body.json"),
    Bad("infinite_number", _valid + ', "score": 1e999}', "body.json"),
    Bad("byte_order_mark", "\ufeff" + ev(), "body.json"),
    Bad("lone_surrogate_escape", _valid + ', "note": "\\ud800"}', "body.json"),
    Bad("raw_tab_in_string", ev(user_id="a\tb").replace("\\t", "\t"), "body.json"),
    Bad("nesting_5000", deep(5000), "body.json", "body: nesting too deep"),
    Bad("nesting_5000_in_a_field", _valid + ', "extra": ' + deep(5000) + "}", "body.json", "body: nesting too deep"),
    # JSON, but not an object.
    Bad("array", '["user_id", "ip"]', "body.type", "body: must be a JSON object, got array"),
    Bad("string", '"a login"', "body.type"),
    Bad("number", "42", "body.type"),
    Bad("null", "null", "body.type"),
    Bad("boolean", "true", "body.type"),
    # A batch of events is a JSON array of objects (stages.decode); an array of arrays is no batch.
    Bad("array_of_arrays_of_events", "[[" + ev() + "]]", "body.type", "body: must be a JSON object, got array"),
    # The wrong kind of message.
    Bad("wrong_type", WRONG_TYPE, "body.not_login_event"),
    Bad("empty_object", "{}", "body.not_login_event"),
    # Missing, empty, null, wrong-typed, oversized fields.
    Bad("missing_user_id", ev(("user_id",)), "user_id.missing", "user_id: required field is missing or null"),
    Bad("missing_device_id", ev(("device_id",)), "device_id.missing"),
    Bad("null_device_id", ev(device_id=None), "device_id.missing"),
    Bad("empty_ip", ev(ip=""), "ip.empty"),
    Bad("empty_device_type", ev(device_type=""), "device_type.empty"),
    Bad("user_id_number", ev(user_id=12345), "user_id.type", "user_id: must be a string, got number"),
    Bad("user_id_boolean", ev(user_id=True), "user_id.type", "user_id: must be a string, got boolean"),
    Bad("ip_integer", ev(ip=3405803853), "ip.type"),
    Bad("device_id_array", ev(device_id=["812-55-1029"]), "device_id.type"),
    Bad("device_type_object", ev(device_type={"os": "android"}), "device_type.type"),
    Bad("app_version_integer", ev(app_version=2), "app_version.type"),
    Bad("app_version_empty", ev(app_version=""), "app_version.empty"),
    Bad("app_version_word", ev(app_version="v2"), "app_version.format"),
    Bad("app_version_sql", ev(app_version="1; DROP TABLE x"), "app_version.format"),
    Bad("locale_number", ev(locale=7), "locale.type"),
    Bad("locale_too_long", ev(locale="x" * 33), "locale.too_long"),
    Bad("user_id_too_long", ev(user_id="u" * 129), "user_id.too_long", "user_id: longer than 128 characters (129)"),
    Bad("device_type_too_long", ev(device_type="d" * 33), "device_type.too_long"),
    Bad("device_id_200kb", ev(device_id="9" * BIG), "device_id.too_long"),
    Bad("user_id_200kb", ev(user_id="u" * BIG), "user_id.too_long"),
    Bad("duplicate_key_last_wins_wrong", _valid + ', "user_id": 5}', "user_id.type"),
    # Invalid IPs.
    Bad("ip_octet_out_of_range", ev(ip="300.1.2.3"), "ip.invalid", "ip: not a valid IPv4 or IPv6 address"),
    Bad("ip_leading_zeros", ev(ip="01.2.3.4"), "ip.invalid"),
    Bad("ip_leading_zero_last_octet", ev(ip="1.2.3.04"), "ip.invalid"),
    Bad("ip_leading_space", ev(ip=" 1.2.3.4"), "ip.invalid"),
    Bad("ip_trailing_newline", ev(ip="1.2.3.4\n"), "ip.invalid"),
    Bad("ip_cidr", ev(ip="10.0.0.0/8"), "ip.invalid"),
    Bad("ip_with_port", ev(ip="1.2.3.4:443"), "ip.invalid"),
    Bad("ip_bracketed_v6", ev(ip="[2001:db8::1]"), "ip.invalid"),
    Bad("ip_hex_octet", ev(ip="0x7f.0.0.1"), "ip.invalid"),
    Bad("ip_short_form", ev(ip="127.1"), "ip.invalid"),
    Bad("ip_hostname", ev(ip="localhost"), "ip.invalid"),
    Bad("ip_fullwidth_digits", ev(ip="１.２.３.４"), "ip.invalid"),
    Bad("ip_v4_with_scope", ev(ip="192.0.2.1%eth0"), "ip.invalid"),
    Bad("ip_v6_two_double_colons", ev(ip="2001::db8::1"), "ip.invalid"),
    Bad("ip_sql", ev(ip="1.2.3.4" + SQL), "ip.invalid"),
    Bad("ip_too_long", ev(ip="1" * 65), "ip.too_long"),
    # NUL characters (JSON escapes: a raw NUL cannot travel through SQS).
    Bad("nul_in_user_id", ev(user_id="a\x00b"), "body.nul", "body: contains a NUL character"),
    Bad("nul_in_device_id", ev(device_id="812\x0055"), "body.nul"),
    Bad("nul_in_unknown_field", ev(note="\x00"), "body.nul"),
    Bad("nul_in_a_key", _valid + ', "a\\u0000b": 1}', "body.nul"),
]

ODD: list[Odd] = [
    Odd("sql_user_id", ev(user_id=SQL), {"user_id": SQL}),
    Odd("sql_user_id_quotes", ev(user_id="Robert'); DROP TABLE students;-- \\ \""),
        {"user_id": "Robert'); DROP TABLE students;-- \\ \""}),
    Odd("sql_device_id", ev(user_id="c-sqldev", device_id=SQL), {"device_id": SQL}),
    Odd("like_wildcards", ev(user_id="%_%\\_"), {"user_id": "%_%\\_"}),
    Odd("emoji", ev(user_id="👩🏽‍💻🚀-1", device_id="📱-42"), {"user_id": "👩🏽‍💻🚀-1", "device_id": "📱-42"}),
    Odd("rtl", ev(user_id="مستخدم-\u202eevil", locale="ar"), {"user_id": "مستخدم-\u202eevil", "locale": "ar"}),
    Odd("combining_marks", ev(user_id="Z̴̡̪a̸l̵g̷o-1"), {"user_id": "Z̴̡̪a̸l̵g̷o-1"}),
    Odd("unicode_escapes", _valid.replace('"c0rpus-0000"', '"\\u00e9t\\u00e9-\\ud83d\\ude00"') + "}",
        {"user_id": "été-😀"}),
    Odd("quotes_tabs_newlines", ev(user_id='a"b\\c\td\ne'), {"user_id": 'a"b\\c\td\ne'}),
    Odd("escaped_backslash_u0000_is_not_nul", ev(user_id="lit-\\u0000"), {"user_id": "lit-\\u0000"}),
    Odd("ipv6_full_form", ev(user_id="c-v6full", ip="2001:0DB8:0000:0000:0000:0000:0000:0001"), {"ip": "2001:db8::1"}),
    Odd("ipv6_upper_case", ev(user_id="c-v6upper", ip="2001:DB8::A"), {"ip": "2001:db8::a"}),
    Odd("ipv4_mapped_v6", ev(user_id="c-mapped", ip="::ffff:198.51.100.7"), {"ip": "198.51.100.7"}),
    Odd("ipv4_mapped_v6_hex", ev(user_id="c-mappedhex", ip="::FFFF:C633:6407"), {"ip": "198.51.100.7"}),
    Odd("ipv6_loopback", ev(user_id="c-v6lo", ip="::1"), {"ip": "::1"}),
    Odd("ipv6_embedded_v4", ev(user_id="c-nat64", ip="64:ff9b::192.0.2.33"), {"ip": "64:ff9b::c000:221"}),
    Odd("ipv6_scoped", ev(user_id="c-scoped", ip="fe80::1%eth0"), {"ip": "fe80::1%eth0"}),
    Odd("ipv4_zero", ev(user_id="c-zero", ip="0.0.0.0"), {"ip": "0.0.0.0"}),
    Odd("locale_missing", ev(("locale",), user_id="c-noloc"), {"locale": None}),
    Odd("locale_null", ev(user_id="c-nullloc", locale=None), {"locale": None}),
    Odd("locale_empty", ev(user_id="c-emptyloc", locale=""), {"locale": ""}),
    Odd("max_lengths", ev(user_id="m" * 128, device_type="t" * 32, device_id="9" * 256, app_version="1" * 32,
                          locale="l" * 32),
        {"user_id": "m" * 128, "device_type": "t" * 32, "device_id": "9" * 256, "app_version": "1" * 32}),
    Odd("app_version_kept_exactly", ev(user_id="c-ver", app_version="2.00"), {"app_version": "2.00"}),
    Odd("extra_200kb_field", ev(user_id="c-big", note="n" * BIG), {"user_id": "c-big"}),
    Odd("nesting_500_in_a_field", _valid.replace("c0rpus-0000", "c-nest") + ', "extra": ' + deep(500) + "}",
        {"user_id": "c-nest"}),
    Odd("unknown_fields", ev(user_id="c-extra", os={"name": "android", "v": [1, 2]})[:-1] + ', "n": 1234567890123456789012345678}',
        {"user_id": "c-extra"}),
    Odd("duplicate_key_last_wins_valid", '{"user_id": 5, ' + _valid[1:].replace("c0rpus-0000", "c-dupkey") + "}",
        {"user_id": "c-dupkey"}),
    Odd("surrounding_whitespace", "\n  " + ev(user_id="c-ws") + "  \n", {"user_id": "c-ws"}),
]

# Raw control characters, not JSON escapes: SQS refuses them (and the transform would, as body.json).
UNSENDABLE = ["raw\x00nul", ev().replace("c0rpus-0000", "raw\x00nul"), ev().replace("c0rpus-0000", "bell\x07"),
              ev().replace("c0rpus-0000", "esc\x1b[31m")]
