"""The only query ``unmask --query`` / ``--where`` will run: a plain read of the configured table.

A read-only transaction is not a sandbox. With a superuser DSN, ``COPY … TO PROGRAM`` runs
shell commands on the database server, ``COPY … TO '/file'`` writes files, and functions such as
``pg_read_file``, ``lo_export``, ``dblink``, ``pg_terminate_backend`` or ``set_config`` act outside
the transaction. So the operator's text is never sent to PostgreSQL. It is tokenized and parsed
here into a small tree (columns, one table, a condition of column-versus-literal comparisons,
an order, a limit), and the SQL that runs is rebuilt from that tree (``pipeline.pii.read``): identifiers are catalog
columns, quoted by us; operators come from a fixed list; every literal is a bound parameter.
Anything outside that shape is refused with a reason, before the query reaches the database.

Accepted::

    SELECT <column>[, …] | * FROM <postgres.table>
      [WHERE <cond>] [ORDER BY <column> [ASC|DESC][, …]] [LIMIT <n>]
    cond := cond OR cond | cond AND cond | NOT cond | ( cond )
          | col (= | <> | != | < | <= | > | >=) lit | col [NOT] (LIKE | ILIKE) 'pattern'
          | col [NOT] IN (lit, …) | col IS [NOT] NULL | col [NOT] BETWEEN lit AND lit
    lit  := 'string' ('' escapes a quote) | [-]number | TRUE | FALSE | NULL
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

__all__ = ["QueryRefused", "Query", "Lit", "parse_query", "parse_where", "parse_columns", "tokenize"]

MAX_LENGTH = 10_000
MAX_DEPTH = 32

_COMPARE = {"=": "=", "<>": "<>", "!=": "<>", "<": "<", "<=": "<=", ">": ">", ">=": ">="}
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_SPACE = " \t\n\r\f"
_DIGITS = "0123456789"
_SUBQUERY = {"SELECT", "WITH", "VALUES", "TABLE"}
# Words that cannot be column names here, so "SELECT FROM t" says so instead of reading a column "from".
_RESERVED = {"SELECT", "FROM", "WHERE", "AND", "OR", "NOT", "ORDER", "BY", "LIMIT", "OFFSET", "IN", "IS", "NULL",
             "LIKE", "ILIKE", "BETWEEN", "TRUE", "FALSE", "ASC", "DESC", "DISTINCT", "ALL", "AS", "UNION",
             "INTERSECT", "EXCEPT", "JOIN", "GROUP", "HAVING", "INTO", "FOR", "WITH", "CASE", "ARRAY", "ROW"}
_SHAPE = "SELECT <columns>|* FROM {table} [WHERE …] [ORDER BY …] [LIMIT n]"


class QueryRefused(ValueError):
    """The text is not a plain read of the configured table; ``reason`` says why in words."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Tok:
    kind: str  # ident | string | number | op | punct | eof
    text: str  # the source text (a string's decoded value)
    pos: int  # 1-based character position

    @property
    def word(self) -> str:
        return self.text.upper() if self.kind == "ident" else ""


@dataclass(frozen=True)
class Lit:
    value: str | None  # text handed to PostgreSQL's input function of the column type; None = NULL
    is_string: bool = False


@dataclass
class Query:
    columns: list[str] | None  # None = every column
    table: str
    where: Any = None  # nested tuples, see _Parser.predicate
    order: list[tuple[str, bool]] = field(default_factory=list)  # (column, descending)
    limit: int | None = None


# --- tokenizer ---------------------------------------------------------------------------


def _refuse(what: str, pos: int) -> QueryRefused:
    return QueryRefused(f"{what} (at character {pos})")


def tokenize(text: str) -> list[Tok]:
    """Tokens of ``text``; refuses at the first character that could start something we do not read."""
    if len(text) > MAX_LENGTH:
        raise QueryRefused(f"the query is longer than {MAX_LENGTH} characters")
    out: list[Tok] = []
    i, n = 0, len(text)
    while i < n:
        c, nxt = text[i], text[i + 1 : i + 2]
        pos = i + 1
        if c in _SPACE:
            i += 1
        elif c == "'":
            value, i = _string(text, i)
            out.append(Tok("string", value, pos))
        elif c.isascii() and (c.isalpha() or c == "_"):
            m = _IDENT.match(text, i)
            assert m is not None
            i = m.end()
            if text[i : i + 1] == "'" or (text[i : i + 1] == "&" and m.group().upper() == "U"):
                raise _refuse(f"prefixed string literals ({m.group()}'…') are not accepted; use a plain '…' string", pos)
            if text[i : i + 1] == "$":
                raise _refuse("'$' (dollar quotes, parameters) is not accepted", i + 1)
            out.append(Tok("ident", m.group(), pos))
        elif c in _DIGITS or (c == "." and nxt != "" and nxt in _DIGITS):
            m = _NUMBER.match(text, i)
            assert m is not None
            i = m.end()
            if i < n and (text[i].isalnum() or text[i] in "_.$"):
                raise _refuse("malformed number", pos)
            out.append(Tok("number", m.group(), pos))
        elif c + nxt in ("--", "/*"):
            raise _refuse("comments are not accepted", pos)
        elif c + nxt == "::":
            raise _refuse("casts ('::') are not accepted", pos)
        elif c == ";":
            raise _refuse("';' is not accepted: one SELECT only", pos)
        elif c == "$":
            raise _refuse("'$' (dollar quotes, parameters) is not accepted", pos)
        elif c == '"':
            raise _refuse('quoted identifiers ("…") are not accepted', pos)
        elif c + nxt in ("<=", ">=", "<>", "!="):
            out.append(Tok("op", c + nxt, pos))
            i += 2
        elif c in "<>=-":
            out.append(Tok("op", c, pos))
            i += 1
        elif c in "(),*":
            out.append(Tok("punct", c, pos))
            i += 1
        elif c == ".":
            raise _refuse("qualified names (schema.table, table.column) are not accepted", pos)
        elif c in "+/~!@#%^&|`?":
            raise _refuse(f"operator '{c}' is not accepted", pos)
        else:
            raise _refuse(f"unexpected character {c!r}", pos)
    out.append(Tok("eof", "", n + 1))
    return out


def _string(text: str, start: int) -> tuple[str, int]:
    """A standard SQL string from ``start`` (its opening quote): backslashes are plain, '' is a quote."""
    parts, i = [], start + 1
    while True:
        end = text.find("'", i)
        if end < 0:
            raise _refuse("unterminated string", start + 1)
        if "\x00" in text[i:end]:
            raise _refuse("a string contains a NUL character", start + 1)
        parts.append(text[i:end])
        if text[end + 1 : end + 2] == "'":
            parts.append("'")
            i = end + 2
            continue
        return "".join(parts), end + 1


# --- parser ------------------------------------------------------------------------------


class _Parser:
    def __init__(self, text: str) -> None:
        self.toks = tokenize(text)
        self.i = 0
        self.depth = 0

    @property
    def tok(self) -> Tok:
        return self.toks[self.i]

    def take(self) -> Tok:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def at(self, *words: str) -> bool:
        return self.tok.word in words if self.tok.kind == "ident" else self.tok.text in words and self.tok.kind in ("punct", "op")

    def expect_word(self, word: str, after: str) -> None:
        if self.tok.word != word:
            raise self.unexpected(f"expected {word} {after}")
        self.take()

    def unexpected(self, what: str) -> QueryRefused:
        tok = self.tok
        if tok.kind == "eof":
            return _refuse(f"{what}, the query ends", tok.pos)
        if tok.kind in ("string", "number"):
            return _refuse(f"{what}, got a literal", tok.pos)
        shown = tok.text
        if tok.word == "SELECT" or tok.text == "(" and self.toks[self.i + 1].word in _SUBQUERY:
            return _refuse("subqueries are not accepted", tok.pos)
        if tok.kind == "ident" and self.toks[self.i + 1].text == "(":
            return _refuse(f"function calls are not accepted: {tok.text}", tok.pos)
        return _refuse(f"{what}, got {shown}", tok.pos)

    def column(self, context: str) -> str:
        tok = self.tok
        if tok.kind != "ident" or self.toks[self.i + 1].text == "(" or tok.word in _RESERVED:
            raise self.unexpected(f"expected a column name {context}")
        self.take()
        return tok.text.lower()  # unquoted identifiers fold to lower case, as in PostgreSQL

    def end(self) -> None:
        if self.tok.kind != "eof":
            raise self.unexpected("expected the end of the query")

    # SELECT <columns> FROM <table> [WHERE] [ORDER BY] [LIMIT]
    def query(self, table: str) -> Query:
        first = self.tok
        if first.word != "SELECT":
            got = first.word or first.text or "nothing"
            raise QueryRefused(f"only {_SHAPE.format(table=table)} is accepted, not {got}")
        self.take()
        columns = self.select_list()
        self.expect_word("FROM", "after the columns")
        name = self.tok
        if name.kind != "ident" or self.toks[self.i + 1].text == "(":
            raise self.unexpected(f"expected the table {table} after FROM")
        self.take()
        if name.text.lower() != table.lower():
            raise _refuse(f"only the configured table {table} can be read, not {name.text}", name.pos)
        if self.at(","):
            raise _refuse("joins and more tables are not accepted", self.tok.pos)
        q = Query(columns, table.lower())
        if self.tok.word == "WHERE":
            self.take()
            q.where = self.disjunction()
        if self.tok.word == "ORDER":
            self.take()
            self.expect_word("BY", "after ORDER")
            q.order = self.order_list()
        if self.tok.word == "LIMIT":
            self.take()
            q.limit = self.limit()
        self.end()
        return q

    def select_list(self) -> list[str] | None:
        if self.at("*"):
            self.take()
            return None
        cols = [self.column("or '*' after SELECT")]
        while self.at(","):
            self.take()
            cols.append(self.column("after ','"))
        return cols

    def order_list(self) -> list[tuple[str, bool]]:
        out = []
        while True:
            col = self.column("after ORDER BY")
            desc = False
            if self.tok.word in ("ASC", "DESC"):
                desc = self.take().word == "DESC"
            out.append((col, desc))
            if not self.at(","):
                return out
            self.take()

    def limit(self) -> int:
        tok = self.tok
        if tok.kind != "number" or not tok.text.isdigit():
            raise self.unexpected("expected a whole number after LIMIT")
        self.take()
        return int(tok.text)

    # conditions: OR binds loosest, then AND, then NOT
    def disjunction(self) -> Any:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _refuse(f"the condition is nested more than {MAX_DEPTH} deep", self.tok.pos)
        parts = [self.conjunction()]
        while self.tok.word == "OR":
            self.take()
            parts.append(self.conjunction())
        self.depth -= 1
        return parts[0] if len(parts) == 1 else ("or", parts)

    def conjunction(self) -> Any:
        parts = [self.negation()]
        while self.tok.word == "AND":
            self.take()
            parts.append(self.negation())
        return parts[0] if len(parts) == 1 else ("and", parts)

    def negation(self) -> Any:
        if self.tok.word == "NOT":
            self.take()
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise _refuse(f"the condition is nested more than {MAX_DEPTH} deep", self.tok.pos)
            inner = self.negation()
            self.depth -= 1
            return ("not", inner)
        if self.at("("):
            self.take()
            if self.tok.word in _SUBQUERY:
                raise _refuse("subqueries are not accepted", self.tok.pos)
            inner = self.disjunction()
            if not self.at(")"):
                raise self.unexpected("expected ')'")
            self.take()
            return inner
        return self.predicate()

    def predicate(self) -> Any:
        col = self.column("in the condition")
        tok = self.tok
        if tok.kind == "op" and tok.text in _COMPARE:
            self.take()
            return ("cmp", col, _COMPARE[tok.text], self.literal())
        if tok.word == "IS":
            self.take()
            negated = self.tok.word == "NOT"
            if negated:
                self.take()
            self.expect_word("NULL", "after IS" + (" NOT" if negated else ""))
            return ("null", col, negated)
        negated = tok.word == "NOT"
        if negated:
            self.take()
        word = self.tok.word
        if word in ("LIKE", "ILIKE"):
            self.take()
            pattern = self.literal()
            if not pattern.is_string:
                raise _refuse(f"{word} needs a quoted '…' pattern", self.toks[self.i - 1].pos)
            return ("like", col, word, negated, pattern)
        if word == "IN":
            self.take()
            if not self.at("("):
                raise self.unexpected("expected '(' after IN")
            self.take()
            if self.tok.word in _SUBQUERY:
                raise _refuse("subqueries are not accepted", self.tok.pos)
            items = [self.literal()]
            while self.at(","):
                self.take()
                items.append(self.literal())
            if not self.at(")"):
                raise self.unexpected("expected ',' or ')' in the IN list")
            self.take()
            return ("in", col, negated, items)
        if word == "BETWEEN":
            self.take()
            low = self.literal()
            self.expect_word("AND", "between the BETWEEN bounds")
            return ("between", col, negated, low, self.literal())
        raise self.unexpected(f"expected a comparison after column {col} "
                              "(= <> != < <= > >= LIKE ILIKE IN IS BETWEEN)")

    def literal(self) -> Lit:
        tok = self.tok
        if tok.kind == "string":
            self.take()
            return Lit(tok.text, is_string=True)
        if tok.kind == "op" and tok.text == "-" and self.toks[self.i + 1].kind == "number":
            self.take()
            return Lit("-" + self.take().text)
        if tok.kind == "number":
            self.take()
            return Lit(tok.text)
        if tok.word in ("TRUE", "FALSE") and self.toks[self.i + 1].text != "(":
            self.take()
            return Lit(tok.word.lower())
        if tok.word == "NULL":
            self.take()
            return Lit(None)
        raise self.unexpected("expected a literal ('string', number, TRUE, FALSE or NULL)")


def parse_query(text: str, table: str) -> Query:
    """Parse ``--query``; raise ``QueryRefused`` for anything but a plain read of ``table``."""
    return _Parser(text).query(table)


def parse_where(text: str) -> Any:
    """Parse ``--where``: the condition alone."""
    p = _Parser(text)
    if p.tok.kind == "eof":
        raise QueryRefused("--where is empty")
    cond = p.disjunction()
    p.end()
    return cond


def parse_columns(text: str) -> list[str] | None:
    """Parse ``--columns``: comma-separated names, or ``*``."""
    p = _Parser(text)
    cols = p.select_list()
    p.end()
    return cols
