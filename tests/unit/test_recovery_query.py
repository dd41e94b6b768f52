"""``unmask --query``'s parser: the accepted shape is rebuilt with bound literals; everything else is refused.

Each refused form names an attack class (functions, subqueries, casts, several statements,
comments, other tables, COPY, WITH, dollar quotes, prefixed strings, ...) or a form outside the
grammar; the reason is checked, so a refusal for the wrong reason shows up too.
"""

from __future__ import annotations

import pytest

from pipeline.pii.query import QueryRefused, parse_columns, parse_query, parse_where
from pipeline.pii.read import Catalog, render

TABLE = "user_logins"
CATALOG = Catalog("public", TABLE, {
    "user_id": "character varying", "device_type": "character varying", "masked_ip": "text",
    "masked_device_id": "text", "locale": "character varying", "app_version": "character varying",
    "create_date": "date", "message_id": "character varying",
})
ALL = '"user_id", "device_type", "masked_ip", "masked_device_id", "locale", "app_version", "create_date", "message_id"'
FROM = 'FROM "public"."user_logins"'
V = "::text::character varying"

ACCEPTED = [
    # the README's example
    ("SELECT user_id, create_date, masked_ip, masked_device_id FROM user_logins WHERE user_id = 'a1'",
     f'SELECT "user_id", "create_date", "masked_ip", "masked_device_id" {FROM} WHERE "user_id" = $1{V}', ["a1"]),
    ("select * from USER_LOGINS", f"SELECT {ALL} {FROM}", []),
    ("SELECT masked_ip FROM user_logins WHERE user_id = 'it''s; DROP TABLE x; --'",
     f'SELECT "masked_ip" {FROM} WHERE "user_id" = $1{V}', ["it's; DROP TABLE x; --"]),
    ("SELECT user_id FROM user_logins WHERE user_id = 'back\\slash'",
     f'SELECT "user_id" {FROM} WHERE "user_id" = $1{V}', ["back\\slash"]),
    ("SELECT User_Id FROM user_logins WHERE create_date >= '2024-01-01' AND create_date < '2024-02-01'",
     f'SELECT "user_id" {FROM} WHERE ("create_date" >= $1::text::date AND "create_date" < $2::text::date)',
     ["2024-01-01", "2024-02-01"]),
    ("SELECT user_id FROM user_logins WHERE (locale = 'US' OR locale != 'DE') AND NOT device_type <> 'ios'",
     f'SELECT "user_id" {FROM} WHERE (("locale" = $1{V} OR "locale" <> $2{V}) AND (NOT "device_type" <> $3{V}))',
     ["US", "DE", "ios"]),
    ("SELECT user_id FROM user_logins WHERE user_id LIKE 'a%' OR user_id NOT ILIKE '%B'",
     f'SELECT "user_id" {FROM} WHERE ("user_id" LIKE $1::text OR "user_id" NOT ILIKE $2::text)', ["a%", "%B"]),
    ("SELECT user_id FROM user_logins WHERE user_id IN ('a', 'b') AND locale NOT IN ('x')",
     f'SELECT "user_id" {FROM} WHERE ("user_id" IN ($1{V}, $2{V}) AND "locale" NOT IN ($3{V}))', ["a", "b", "x"]),
    ("SELECT user_id FROM user_logins WHERE masked_ip IS NULL OR masked_device_id IS NOT NULL",
     f'SELECT "user_id" {FROM} WHERE ("masked_ip" IS NULL OR "masked_device_id" IS NOT NULL)', []),
    ("SELECT user_id FROM user_logins WHERE create_date BETWEEN '2024-01-01' AND '2024-12-31' AND app_version = 2.5",
     f'SELECT "user_id" {FROM} WHERE ("create_date" BETWEEN $1::text::date AND $2::text::date AND "app_version" = $3{V})',
     ["2024-01-01", "2024-12-31", "2.5"]),
    ("SELECT user_id FROM user_logins WHERE app_version NOT BETWEEN -1 AND 1e3 OR locale = NULL OR locale = TRUE",
     f'SELECT "user_id" {FROM} WHERE ("app_version" NOT BETWEEN $1{V} AND $2{V} OR "locale" = $3{V} OR "locale" = $4{V})',
     ["-1", "1e3", None, "true"]),
    ("SELECT * FROM user_logins ORDER BY create_date DESC, user_id LIMIT 10",
     f'SELECT {ALL} {FROM} ORDER BY "create_date" DESC, "user_id" ASC LIMIT $1::text::bigint', ["10"]),
    ("\n  SELECT user_id\tFROM user_logins  WHERE ((user_id = 'x'))\n",
     f'SELECT "user_id" {FROM} WHERE "user_id" = $1{V}', ["x"]),
]


@pytest.mark.parametrize(("text", "sql", "params"), ACCEPTED, ids=[a[0][:60] for a in ACCEPTED])
def test_accepted_forms_are_rebuilt_with_bound_literals(text: str, sql: str, params: list) -> None:
    assert render(parse_query(text, TABLE), CATALOG) == (sql, params)


REFUSED = [
    # statements other than SELECT
    ("COPY (SELECT 1) TO PROGRAM 'rm -rf /'", "not COPY"),
    ("COPY user_logins TO '/tmp/out.csv'", "not COPY"),
    ("WITH d AS (DELETE FROM user_logins RETURNING *) SELECT * FROM d", "not WITH"),
    ("DELETE FROM user_logins", "not DELETE"),
    ("EXPLAIN ANALYZE DELETE FROM user_logins", "not EXPLAIN"),
    ("SET ROLE postgres", "not SET"),
    ("(SELECT * FROM user_logins)", "not ("),
    ("", "not nothing"),
    # several statements, comments
    ("SELECT * FROM user_logins; DELETE FROM user_logins", "';' is not accepted"),
    ("SELECT * FROM user_logins WHERE user_id = 'x';", "';' is not accepted"),
    ("SELECT * FROM user_logins -- trailing", "comments are not accepted"),
    ("SELECT * FROM user_logins /* c */", "comments are not accepted"),
    # functions, anywhere
    ("SELECT pg_read_file('/etc/passwd') FROM user_logins", "function calls are not accepted: pg_read_file"),
    ("SELECT lo_export(lo_import('/etc/passwd'), '/tmp/x') FROM user_logins", "function calls are not accepted: lo_export"),
    ("SELECT user_id FROM user_logins WHERE user_id = pg_read_file('/etc/hostname')", "function calls are not accepted"),
    ("SELECT * FROM user_logins WHERE pg_terminate_backend(1) IS NULL", "function calls are not accepted"),
    ("SELECT set_config('role', 'postgres', false) FROM user_logins", "function calls are not accepted: set_config"),
    ("SELECT * FROM user_logins WHERE user_id = 'a' AND pg_sleep(10) IS NULL", "function calls are not accepted"),
    ("SELECT * FROM dblink('dbname=x', 'DELETE FROM user_logins')", "function calls are not accepted: dblink"),
    ("SELECT * FROM user_logins WHERE user_id = TRUE()", "function calls are not accepted"),
    # subqueries, other tables, set operations, locking
    ("SELECT * FROM user_logins WHERE user_id IN (SELECT rolname FROM pg_roles)", "subqueries are not accepted"),
    ("SELECT * FROM user_logins WHERE (SELECT 1) = 1", "subqueries are not accepted"),
    ("SELECT * FROM user_logins WHERE user_id = (SELECT 1)", "subqueries are not accepted"),
    ("SELECT * FROM pg_authid", "only the configured table user_logins can be read, not pg_authid"),
    ("SELECT * FROM public.user_logins", "qualified names"),
    ("SELECT user_logins.user_id FROM user_logins", "qualified names"),
    ("SELECT * FROM user_logins, pg_authid", "joins and more tables"),
    ("SELECT * FROM user_logins JOIN pg_authid ON TRUE", "expected the end of the query, got JOIN"),
    ("SELECT * FROM user_logins UNION SELECT * FROM pg_authid", "got UNION"),
    ("SELECT * FROM user_logins FOR UPDATE", "got FOR"),
    ("SELECT * FROM user_logins u", "expected the end of the query, got u"),
    ("SELECT * FROM user_logins LIMIT 1 OFFSET 1", "got OFFSET"),
    # literals and quoting
    ("SELECT * FROM user_logins WHERE user_id = $$x$$", "'$'"),
    ("SELECT * FROM user_logins WHERE user_id = $1", "'$'"),
    ("SELECT * FROM user_logins WHERE user_id = E'\\x27'", "prefixed string literals (E'…')"),
    ("SELECT * FROM user_logins WHERE user_id = e'x'", "prefixed string literals"),
    ("SELECT * FROM user_logins WHERE user_id = U&'\\0041'", "prefixed string literals"),
    ("SELECT * FROM user_logins WHERE user_id = B'101'", "prefixed string literals"),
    ("SELECT * FROM user_logins WHERE user_id = X'1f'", "prefixed string literals"),
    ("SELECT * FROM user_logins WHERE user_id = N'x'", "prefixed string literals"),
    ("SELECT * FROM user_logins WHERE user_id = 'unterminated", "unterminated string"),
    ("SELECT * FROM user_logins WHERE user_id = 'a\x00b'", "NUL"),
    ("SELECT * FROM user_logins WHERE \"user_id\" = 'x'", "quoted identifiers"),
    ("SELECT * FROM user_logins WHERE user_id::text = 'x'", "casts ('::')"),
    ("SELECT * FROM user_logins WHERE user_id = 'x'::text", "casts ('::')"),
    ("SELECT * FROM user_logins WHERE user_id = 0x1f", "malformed number"),
    ("SELECT * FROM user_logins WHERE user_id = 1_000", "malformed number"),
    ("SELECT * FROM user_logins WHERE user_id = 'a' || 'b'", "operator '|'"),
    ("SELECT * FROM user_logins WHERE user_id ~ 'a'", "operator '~'"),
    ("SELECT * FROM user_logins WHERE user_id = 1 + 1", "operator '+'"),
    ("SELECT * FROM user_logins WHERE user_id = ARRAY['a']", "unexpected character '['"),
    ("SELECT * FROM user_logins WHERE user_id = ARRAY", "expected a literal"),
    ("SELECT * FROM user_logins WHERE user_id = 'a' 'b'", "got a literal"),
    ("SELECT * FROM user_logins WHERE user_id = user_id", "expected a literal"),
    ("SELECT * FROM user_logins WHERE user_id LIKE 5", "LIKE needs a quoted"),
    ("SELECT * FROM user_logins WHERE user_id LIKE 'a' ESCAPE '!'", "got ESCAPE"),
    ("SELECT * FROM user_logins WHERE user_id IN ()", "expected a literal"),
    ("SELECT * FROM user_logins WHERE user_id IS TRUE", "expected NULL after IS"),
    ("SELECT * FROM user_logins WHERE user_id", "expected a comparison after column user_id"),
    ("SELECT * FROM user_logins WHERE 'x' = user_id", "expected a column name in the condition, got a literal"),
    ("SELECT * FROM user_logins WHERE user_id = 'x' AND", "the query ends"),
    ("SELECT * FROM user_logins WHERE (user_id = 'x'", "expected ')'"),
    ("SELECT * FROM user_logins WHERE user_id = 'x' LIMIT -1", "expected a whole number after LIMIT"),
    ("SELECT * FROM user_logins LIMIT 1.5", "expected a whole number after LIMIT"),
    ("SELECT * FROM user_logins WHERE " + "(" * 40 + "user_id = 'x'" + ")" * 40, "nested more than 32"),
    ("SELECT * FROM user_logins WHERE " + "NOT " * 40 + "user_id = 'x'", "nested more than 32"),
    ("SELECT * FROM user_logins WHERE user_id = 'x'" + " " * 10_001, "longer than 10000"),
    # the select list
    ("SELECT FROM user_logins", "expected a column name or '*' after SELECT, got FROM"),
    ("SELECT DISTINCT user_id FROM user_logins", "got DISTINCT"),
    ("SELECT *, user_id FROM user_logins", "expected FROM after the columns"),
    ("SELECT user_id AS u FROM user_logins", "expected FROM after the columns, got AS"),
    ("SELECT count(*) FROM user_logins", "function calls are not accepted: count"),
    ("SELECT 1 FROM user_logins", "expected a column name"),
    ("SELECT user_id FROM user_logins WHERE user_ıd = 'x'", "unexpected character 'ı'"),
    ("SELECT user_id FROM user_logins WHERE user_id = '1' \\g", "unexpected character '\\\\'"),
    ("SELECT * FROM user_logins WHERE user_id = 'x'\x00", "unexpected character '\\x00'"),
]


@pytest.mark.parametrize(("text", "reason"), REFUSED, ids=[r[0][:60] for r in REFUSED])
def test_refused_forms_say_why(text: str, reason: str) -> None:
    with pytest.raises(QueryRefused) as err:
        parse_query(text, TABLE)
    assert reason in err.value.reason


@pytest.mark.parametrize(("text", "reason"), [
    ("SELECT user_id, current_user FROM user_logins", "user_logins has no column current_user"),
    ("SELECT * FROM user_logins WHERE session_user = 'postgres'", "has no column session_user"),
    ("SELECT * FROM user_logins ORDER BY nope", "has no column nope"),
])
def test_names_must_be_columns_of_the_table(text: str, reason: str) -> None:
    with pytest.raises(QueryRefused, match=reason):
        render(parse_query(text, TABLE), CATALOG)


def test_refusal_reports_where() -> None:
    with pytest.raises(QueryRefused, match=r"function calls are not accepted: pg_read_file \(at character 8\)"):
        parse_query("SELECT pg_read_file('/x') FROM user_logins", TABLE)


def test_where_and_columns_options() -> None:
    assert parse_columns("user_id, masked_ip") == ["user_id", "masked_ip"] and parse_columns("*") is None
    assert parse_where("user_id = 'a' OR locale IS NULL") == (
        "or", [("cmp", "user_id", "=", parse_where("x = 'a'")[3]), ("null", "locale", False)])
    for bad, reason in [("user_id = 'a'; DELETE FROM user_logins", "';'"), ("", "empty"),
                        ("user_id = 'a' ORDER BY user_id", "expected the end"),
                        ("pg_read_file('x') IS NULL", "function calls")]:
        with pytest.raises(QueryRefused, match=reason):
            parse_where(bad)
    with pytest.raises(QueryRefused, match="function calls"):
        parse_columns("user_id, pg_read_file('x')")


def test_unmask_all_tells_no_token_from_a_forged_spelling() -> None:
    from pipeline.pii.unmask import Refused, unmask_all
    from stages.masking import Masker, generate_key

    m = Masker([generate_key("k1")])
    token = m.mask("1.2.3.4")
    for value, message in [("1.2.3.4", "value #2 is not a masked value"), (" " + token, "value #2 is not a masked value"),
                           (token + "=", "value #2 does not decrypt under key 'k1' (corrupt or forged)"),
                           ("k1.", "value #2 does not decrypt under key 'k1' (corrupt or forged)")]:
        with pytest.raises(Refused) as err:
            unmask_all(m, [token, value])
        assert str(err.value).startswith(message) and err.value.reason.startswith("value #2: ")
