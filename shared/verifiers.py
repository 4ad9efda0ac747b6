r"""Answer verifiers: find the final answer in a model's text and check it against the gold answer.

Model text is untrusted input. A policy being optimised against a reward will, sooner or later,
produce whatever string makes the reward code misbehave, so these functions are written like a
parser facing the internet, not like a grading script.

Safety design
-------------
1. Nothing is executed. There is no eval/exec/compile and no sympy (`sympify` and `parse_expr`
   call eval). Numbers are matched by strict regexes and built with `fractions.Fraction`, so
   float error ("0.1 + 0.2") cannot make a right answer wrong or a wrong one right. Countdown
   equations are parsed with `ast.parse(mode="eval")`, which builds a tree and runs nothing, and
   walked with an explicit allow-list: numbers, + - * / ( ), unary minus/plus, and ** only on
   request. Names, calls, attributes, subscripts, strings, lambdas and comprehensions are
   rejected twice: by a character filter before parsing and by the allow-list after it.
2. All work is bounded. Only the last `MAX_TEXT_CHARS` characters of a completion are read.
   Answers longer than `MAX_ANSWER_CHARS` and expressions longer than `MAX_EXPR_CHARS` are
   rejected, not truncated, because truncation could turn a wrong answer into a right one. A
   number has at most `MAX_DIGITS` digits and a decimal exponent of at most `MAX_EXPONENT`. An
   expression has at most `MAX_NODES` syntax nodes, which also bounds the recursion depth. Every
   intermediate value has at most `MAX_VALUE_BITS` bits, and powers are size-checked *before*
   they are computed. A cooperative deadline backs all of this up: `time.monotonic` is checked at
   every node, and the budget includes parsing. It needs no signals, so it works in threads.
3. Regexes run in linear time: no input can be split between the parts of a pattern in more
   than one way that needs trying. Adjacent quantifiers take disjoint characters
   (`answer\s*:[\s*]*([^\s*][^\n]*)`); `_LEADING_EQUATION` is only used anchored (`match`), its
   one nested quantifier is fenced by parentheses that nothing else in it accepts, and a failed
   match backs off over its input once. Every pattern is compiled here, and the tests count the
   characters each one is given. `\boxed{...}` brace matching is one left-to-right pass with a
   stack. Inputs of 10^6 characters return in milliseconds.
4. Only ASCII digits count. Python's `\d`, `int()` and `Fraction()` all accept other Unicode
   digits ('٣' is 3, fullwidth '４５' is 45). Every pattern here spells out `[0-9]`, and
   `Fraction` only sees strings that such a pattern has already matched.
5. Failures have one shape. `extract_answer` and `parse_number` return None; `safe_arith` and
   `countdown_numbers_used` raise ValueError; `verify_math` and `verify_countdown` never raise on
   any text. An unexpected internal error costs that completion its reward instead of the
   training run. Tests set `_RAISE_INTERNAL_ERRORS` so that such bugs still surface.
"""

from __future__ import annotations

import ast
import re
import time
from dataclasses import dataclass
from fractions import Fraction

# ----------------------------------------------------------------------------------------------
# Limits. Generous for real answers (GSM8K/MATH answers are a few characters, Countdown
# equations ~20), tiny compared to what an adversarial completion can contain.
# ----------------------------------------------------------------------------------------------
MAX_TEXT_CHARS = 10_000  # only the tail of a completion is searched for the final answer
MAX_ANSWER_CHARS = 200  # longest extracted answer / string given to parse_number
MAX_EXPR_CHARS = 300  # longest arithmetic expression given to safe_arith
MAX_DIGITS = 50  # most digits in one number or literal
MAX_EXPONENT = 100  # largest |e| in scientific notation such as 1.5e3
MAX_NODES = 256  # most AST nodes in an expression (bounds the recursion depth too)
MAX_VALUE_BITS = 1024  # most bits in the numerator or denominator of any intermediate value
MAX_POW_EXPONENT = 32  # largest |exponent| for ** when allow_pow=True
DEADLINE_S = 0.1  # default wall-clock budget of one safe_arith call

MODES = ("boxed", "answer", "last_number", "answer_or_last_number")  # see extract_answer

# Tests flip this to re-raise unexpected errors inside verify_* instead of scoring them 0.
_RAISE_INTERNAL_ERRORS = False

# The deadline clock; a module attribute so tests can simulate a slow machine.
_clock = time.monotonic


@dataclass(frozen=True)
class Verdict:
    format_ok: bool  # an answer could be extracted in the expected format
    correct: bool  # the extracted answer equals the gold answer
    answer: str | None  # the extracted answer (at most MAX_ANSWER_CHARS/MAX_EXPR_CHARS) or None


_FAIL = Verdict(format_ok=False, correct=False, answer=None)

# ----------------------------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------------------------

# A number in free text: 1,234 (thousands commas) or 1234, an optional .5 decimal part, an
# optional /7 denominator. A '-' is a sign only when it does not follow something it could be
# subtracting from, so "50-23" yields 50 and 23 rather than 50 and -23.
_NUMBER_IN_TEXT = re.compile(
    r"(?:(?<![0-9A-Za-z)\]}])[-\u2212])?"  # optional sign (ASCII or Unicode minus)
    r"(?<![0-9.])"  # do not start inside another number
    r"(?:[0-9]{1,3}(?:,[0-9]{3})+(?![0-9])|[0-9]+)"  # 1,234,567 or 1234567
    r"(?:\.[0-9]+)?"  # .25
    r"(?:/[0-9]+)?"  # /7
)
# "Answer: ..." to the end of the line (the DAPO / verl math_dapo convention). Spaces, newlines
# and markdown stars after the colon are skipped, so "**Answer:**\n42" reads 42. `[\s*]*` and
# `[^\s*]` share no character, so the match is found without searching.
_ANSWER_LINE = re.compile(r"answer\s*:[\s*]*([^\s*][^\n]*)", re.IGNORECASE)
# On a (stripped) "Answer:" line, a leading "<arithmetic> =" or "x =" before the result:
# "6 * 7 = 42", "(3 + 4) * 6 = 42", "\$9 \times 2 = \$18", "x = 2 + 3 = 5". A parenthesis may
# hold arithmetic but no '=', so in "40 (6 * 7 = 42, minus 2)" the '=' belongs to a remark and
# nothing is cut; nor is it after words ("18. She had 16 - 7 = 9 eggs"). Used with match();
# each alternative starts with a character no other one accepts, so the scan is linear.
_LEADING_EQUATION = re.compile(
    r"(?:[A-Za-z]\s*=)?"
    r"(?:[0-9\s.,+\-*/{}$=\u00d7\u00f7\u00b7\u2212]"  # digits, operators, spaces, $, '='
    r"|\([^()=]*\)"  # a parenthesis without '='
    r"|\\(?:times|cdot|div|[dt]?frac|\$))*="  # LaTeX operators, fractions, \$
)
# Tokens for the one-pass brace matcher: an opening \boxed{, any other {, any }.
_BOX_TOKEN = re.compile(r"\\boxed\s*\{|[{}]")


def _last_boxed(text: str) -> str | None:
    """Content of the last complete \\boxed{...} (the one that opens last), braces balanced."""
    stack: list[int] = []  # per open brace: content start if it opened a \boxed, else -1
    best: tuple[int, int] | None = None
    for m in _BOX_TOKEN.finditer(text):
        token = m.group()
        if token == "}":
            if stack:  # unmatched closing braces (e.g. cut off by the tail window) are ignored
                start = stack.pop()
                if start >= 0 and (best is None or start > best[0]):
                    best = (start, m.start())
        else:
            stack.append(m.end() if token != "{" else -1)
    return None if best is None else text[best[0] : best[1]]


def _last_answer_line(text: str) -> str | None:
    """What follows the last 'Answer:' on its line, without markdown bold around it."""
    last = None
    for last in _ANSWER_LINE.finditer(text):
        pass
    return None if last is None else last.group(1).strip().strip("*").strip()


def _last_number(text: str) -> str | None:
    last = None
    for last in _NUMBER_IN_TEXT.finditer(text):
        pass
    return None if last is None else last.group()


def _number_on_answer_line(line: str) -> str | None:
    """The number an "Answer:" line gives: after a leading "<arithmetic> =" if there is one, the
    whole rest when it is a number ("\\$1{,}234", "\\frac{1}{2}", "12\\%"), else its first
    number, so that a remark after the answer ("42 apples", "42 (6 * 7)") cannot change it."""
    lead = _LEADING_EQUATION.match(line)
    rest = line[lead.end() :] if lead else line
    if parse_number(rest) is not None:
        return rest
    first = _NUMBER_IN_TEXT.search(rest)
    return None if first is None else first.group()


def extract_answer(text: str, mode: str) -> str | None:
    """The final answer in `text`, or None when there is none in the expected format.

    Modes:
      "boxed"        content of the last \\boxed{...} (MATH); the whole content is the answer.
      "answer"       rest of the last "Answer:" line; the whole rest is the answer.
      "last_number"  the last number in the text (-3, 1,234, 2.5, 1/2).
      "answer_or_last_number"  (GSM8K) the number on the last "Answer:" line, read with
                     `_number_on_answer_line` (so "Answer: 42" followed by a remark reads 42);
                     the last number in the text when there is no "Answer:" line at all. An
                     "Answer:" line without a number gives None (no fallback past it).
    Only the last MAX_TEXT_CHARS characters are read. Answers that are empty or longer than
    MAX_ANSWER_CHARS give None.
    """
    if mode not in MODES:
        raise ValueError(f"unknown answer mode {mode!r}; expected one of {MODES}")
    if not isinstance(text, str):
        return None
    tail = text[-MAX_TEXT_CHARS:]
    if mode == "boxed":
        answer = _last_boxed(tail)
    elif mode == "answer":
        answer = _last_answer_line(tail)
    elif mode == "last_number":
        answer = _last_number(tail)
    else:
        line = _last_answer_line(tail)
        answer = _last_number(tail) if line is None else _number_on_answer_line(line)
    if answer is None:
        return None
    answer = answer.strip()
    return answer if 0 < len(answer) <= MAX_ANSWER_CHARS else None


# ----------------------------------------------------------------------------------------------
# Numbers
# ----------------------------------------------------------------------------------------------
# How an answer is read, in order (`_strip_decorations`):
#   1. "$" and "\$" go, so do Unicode minus signs (to '-') and one \boxed{...} around everything.
#   2. An answer that is all \text{...} is its content: \text{68} is 68.
#   3. Trailing decorations go, a few in a row: '.', \%, %, ^\circ, ^{\circ}, °, LaTeX spaces,
#      and a \text{...} unit without digits after a value: 68\text{ cm}, 5\text{ cm}^2.
#   4. A leading "x =" (one letter or one LaTeX name, optional subscript) goes.
#   5. Other \text{...} become their content, so "5\text{ or }6" stays "5 or 6", never 56.
#   6. Thousands separators {,} \, \! go; other LaTeX spaces become spaces.
#   7. Whitespace goes, except between two number characters (digits . ,), where it stays to
#      keep "6 8" and "1, 234" from becoming 68 and 1234 (`_normalize_text` drops it later, for
#      answers that are compared as text, and `_answers_match` never compares a number as text).
# Rules a careful grader could make differently (the tests name them): 12\% is 12, not 0.12;
# 2\frac{1}{2} is the mixed number 5/2; plain words after a number ("68 cm") are not a unit.

_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textrm|textnormal|mbox|mathrm)\s*\{([^{}]*)\}")
# A unit after the value: \text{...} without digits or backslashes, perhaps squared or cubed.
# Used with fullmatch from the last backslash of the answer.
_TEXT_UNIT = re.compile(
    r"\\(?:text|textbf|textrm|textnormal|mbox|mathrm)\s*\{[^{}0-9\\]*\}(?:\^\{?[23]\}?)?\s*"
)
_TRAILING_MARKS = ("\\%", "%", "^{\\circ}", "^\\circ", "\\circ", "\u00b0", "\\degree", ".",
                   "\\,", "\\;", "\\:", "\\!", "\\ ", "~", "\\quad")
_MAX_TRAILING = 6  # most trailing decorations removed from one answer ("5\text{ cm}^2\,." is 3)
_LEADING_VARIABLE = re.compile(r"\s*(?:[A-Za-z]|\\[A-Za-z]+)(?:_\{?[0-9A-Za-z]+\}?)?\s*=(?!=)")
_LATEX_SPACE = re.compile(r"\\[;: ]|\\quad|~")
_WHITESPACE = re.compile(r"\s+")
_NUMBER_CHARS = frozenset("0123456789.,")
_ONLY_BOXED = re.compile(r"\\boxed\{(.*)\}", re.DOTALL)  # used with fullmatch
_INT = r"[-+]?[0-9]+"
_FRAC_LATEX = re.compile(rf"(-?)\\[dt]?frac\{{({_INT})\}}\{{({_INT})\}}")  # \frac{1}{2}
_FRAC_LATEX_SHORT = re.compile(r"(-?)\\[dt]?frac([0-9])([0-9])")  # \frac12
_MIXED_LATEX = re.compile(  # 2\frac{1}{2}, -3\tfrac14
    r"([-+]?)([0-9]+)\\[dt]?frac(?:\{([0-9]+)\}\{([0-9]+)\}|([0-9])([0-9]))"
)
_FRAC_SLASH = re.compile(rf"({_INT})/({_INT})")  # 1/2, -3/4
_DECIMAL = re.compile(
    r"([-+]?(?:[0-9]{1,3}(?:,[0-9]{3})+(?:\.[0-9]+)?|[0-9]+(?:\.[0-9]*)?|\.[0-9]+))"
    r"(?:[eE]([-+]?[0-9]+))?"
)
_DFRAC = re.compile(r"\\[dt]frac")
_SHORT_FRAC = re.compile(r"\\frac([0-9])([0-9])")  # \frac12 -> \frac{1}{2}
_SHORT_SQRT = re.compile(r"\\sqrt([0-9A-Za-z])")  # \sqrt2 -> \sqrt{2}


def _strip_trailing(s: str) -> str:
    """Step 3: remove up to _MAX_TRAILING trailing decorations (units, %, degrees, '.')."""
    for _ in range(_MAX_TRAILING):
        s = s.rstrip()
        for mark in _TRAILING_MARKS:
            if s.endswith(mark):
                s = s[: -len(mark)]
                break
        else:
            i = s.rfind("\\")
            if i > 0 and s[:i].strip() and _TEXT_UNIT.fullmatch(s, i):
                s = s[:i]
            else:
                break
    return s.rstrip()


def _keep_space_between_numbers(m: re.Match) -> str:
    s, i, j = m.string, m.start(), m.end()
    glued = 0 < i and j < len(s) and s[i - 1] in _NUMBER_CHARS and s[j] in _NUMBER_CHARS
    return " " if glued else ""


def _strip_decorations(s: str) -> str:
    """Remove what does not change a value (steps 1-7 above)."""
    s = s.strip().replace("\u2212", "-").replace("\\$", "").replace("$", "")
    boxed = _ONLY_BOXED.fullmatch(s)
    if boxed:
        s = boxed.group(1).strip()
    only_text = _TEXT_WRAPPER.fullmatch(s)
    if only_text:
        s = only_text.group(1)
    s = _strip_trailing(s)
    variable = _LEADING_VARIABLE.match(s)
    if variable and s[variable.end() :].strip():
        s = s[variable.end() :]
    s = _TEXT_WRAPPER.sub(r"\1", s)
    s = s.replace("{,}", ",").replace("\\!", "").replace("\\,", "")
    s = _LATEX_SPACE.sub(" ", s)
    s = _WHITESPACE.sub(_keep_space_between_numbers, s.strip())
    return s.rstrip(".").rstrip()


def parse_number(s: str) -> Fraction | None:
    """Exact value of a number written as 68, -3, 2.50, 1,234, 1{,}234, 1/2, \\frac{1}{2},
    \\dfrac34, 2\\frac{1}{2}, 1.5e3, $68$, \\$68, 68\\text{ cm}, 12\\%, 30^\\circ, x = 5 or "68." -
    or None. ASCII digits only; at most MAX_DIGITS digits."""
    if not isinstance(s, str) or len(s) > MAX_ANSWER_CHARS:
        return None
    return _value(_strip_decorations(s))


def _value(t: str) -> Fraction | None:
    """The value of an answer that `_strip_decorations` has cleaned, or None."""
    if t.isdigit() and t.isascii() and len(t) <= MAX_DIGITS:  # the common case, "68"
        return Fraction(int(t))
    if sum(c.isdigit() for c in t) > MAX_DIGITS:  # counts Unicode digits too: those fail below
        return None
    for pattern in (_FRAC_LATEX, _FRAC_LATEX_SHORT):
        m = pattern.fullmatch(t)
        if m:
            sign, num, den = m.groups()
            return _ratio(int(num), int(den), negate=sign == "-")
    m = _MIXED_LATEX.fullmatch(t)
    if m:  # a mixed number only when the fraction is proper: 2\frac{1}{2}, not 2\frac{3}{2}
        sign, whole = m.group(1), int(m.group(2))
        num, den = int(m.group(3) or m.group(5)), int(m.group(4) or m.group(6))
        if 0 < num < den:
            value = whole + Fraction(num, den)
            return -value if sign == "-" else value
        return None
    m = _FRAC_SLASH.fullmatch(t)
    if m:
        return _ratio(int(m.group(1)), int(m.group(2)))
    m = _DECIMAL.fullmatch(t)
    if m:
        mantissa, exponent = m.groups()
        if exponent is not None and abs(int(exponent)) > MAX_EXPONENT:
            return None  # Fraction("1e999999999") would compute 10**999999999
        value = Fraction(mantissa.replace(",", ""))
        return value * Fraction(10) ** int(exponent) if exponent else value
    return None


def _ratio(num: int, den: int, negate: bool = False) -> Fraction | None:
    if den == 0:
        return None
    return Fraction(-num if negate else num, den)


def _canonical_text(t: str) -> str:
    """Canonical form of a cleaned answer that is not a number (MATH's \\sqrt{2}/2, (1,2))."""
    t = _DFRAC.sub(r"\\frac", _WHITESPACE.sub("", t)).replace("\\left", "").replace("\\right", "")
    return _SHORT_SQRT.sub(r"\\sqrt{\1}", _SHORT_FRAC.sub(r"\\frac{\1}{\2}", t))


def _answers_match(answer: str, gold: str) -> bool:
    """Equal as numbers when either side is one (so "6 8", which is no number, never equals 68),
    else equal as canonical text."""
    a_clean, g_clean = _strip_decorations(answer), _strip_decorations(gold)
    a = _value(a_clean) if len(answer) <= MAX_ANSWER_CHARS else None
    g = _value(g_clean) if len(gold) <= MAX_ANSWER_CHARS else None
    if a is not None or g is not None:
        return a == g
    a_text = _canonical_text(a_clean)
    return bool(a_text) and a_text == _canonical_text(g_clean)


def verify_math(text: str, gold: str, mode: str = "last_number") -> Verdict:
    """Extract the answer from `text` with `mode` (see `extract_answer`) and compare it to `gold`:
    exactly as numbers when either parses (so 68.0 == 68, 1/2 == 0.5, \\$18 == 18), else as
    normalized strings. Never raises on any `text`; raises ValueError only for an unknown `mode`."""
    if mode not in MODES:
        raise ValueError(f"unknown answer mode {mode!r}; expected one of {MODES}")
    try:
        answer = extract_answer(text, mode)
        if answer is None:
            return _FAIL
        return Verdict(format_ok=True, correct=_answers_match(answer, str(gold)), answer=answer)
    except Exception:  # a verifier bug must cost one reward, not the training run
        if _RAISE_INTERNAL_ERRORS:
            raise
        return _FAIL


# ----------------------------------------------------------------------------------------------
# Arithmetic expressions
# ----------------------------------------------------------------------------------------------

# First gate, before parsing: nothing but digits, operators, parentheses, '.', spaces.
# No letters means no names, keywords, attributes, strings, lambdas or calls of names.
_ARITH_CHARS = re.compile(r"[0-9+\-*/(). \t]*")
# Other ways models write operators, mapped to the ASCII ones before the gate.
_OPERATOR_ALIASES = {"\u00d7": "*", "\u00f7": "/", "\u2212": "-", "\\times": "*", "\\cdot": "*",
                     "\\div": "/"}
# Second gate, after parsing: the only node types the evaluator accepts.
_ALLOWED_NODES = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Constant,
                  ast.Add, ast.Sub, ast.Mult, ast.Div, ast.UAdd, ast.USub)
_LITERAL = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")  # what a Constant's source text may be


def _parse_arith(expr: str, allow_pow: bool) -> tuple[str, ast.Expression]:
    """Check and parse an arithmetic expression. Returns (normalized source, tree); the tree
    contains only allow-listed nodes. Raises ValueError otherwise."""
    if not isinstance(expr, str):
        raise ValueError("expression must be a string")
    if len(expr) > MAX_EXPR_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPR_CHARS} characters")
    for alias, op in _OPERATOR_ALIASES.items():
        expr = expr.replace(alias, op)
    source = expr.strip()
    if not source:
        raise ValueError("empty expression")
    if not _ARITH_CHARS.fullmatch(source):
        raise ValueError("only digits, + - * / ( ) . and spaces are allowed")
    try:
        tree = ast.parse(source, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise ValueError("not a valid arithmetic expression") from None
    allowed = _ALLOWED_NODES + ((ast.Pow,) if allow_pow else ())
    for count, node in enumerate(ast.walk(tree), start=1):
        if count > MAX_NODES:
            raise ValueError(f"expression has more than {MAX_NODES} syntax nodes")
        if not isinstance(node, allowed):
            raise ValueError(f"disallowed syntax: {type(node).__name__}")
    return source, tree


class _Evaluator:
    """Exact evaluation of an allow-listed tree over Fractions, with size and time limits.

    It re-checks every node type itself, so it is safe even on a tree that `_parse_arith` did
    not produce. `source` is the single-line ASCII text the tree was parsed from: literals are
    read from their source text, because the float in the tree (0.1) is not the number written.
    """

    def __init__(self, source: str, allow_pow: bool, deadline: float):
        self.source, self.allow_pow, self.deadline = source, allow_pow, deadline

    def __call__(self, node: ast.AST) -> Fraction:
        if _clock() > self.deadline:
            raise ValueError("arithmetic deadline exceeded")
        if isinstance(node, ast.Expression):
            return self(node.body)
        if isinstance(node, ast.Constant):
            return self.literal(node)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            value = self(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.BinOp):
            a, b = self(node.left), self(node.right)
            op = node.op
            if isinstance(op, ast.Add):
                return _bounded(a + b)
            if isinstance(op, ast.Sub):
                return _bounded(a - b)
            if isinstance(op, ast.Mult):
                return _bounded(a * b)
            if isinstance(op, ast.Div):
                if b == 0:
                    raise ValueError("division by zero")
                return _bounded(a / b)
            if isinstance(op, ast.Pow) and self.allow_pow:
                return _bounded_pow(a, b)
        raise ValueError(f"disallowed syntax: {type(node).__name__}")

    def literal(self, node: ast.Constant) -> Fraction:
        if type(node.value) not in (int, float):  # no strings, bytes, bool, None, complex, ...
            raise ValueError(f"disallowed literal {type(node.value).__name__}")
        text = self.source[node.col_offset : node.end_col_offset]
        if node.lineno != 1 or node.end_lineno != 1 or not _LITERAL.fullmatch(text):
            raise ValueError(f"unsupported number literal {text[:20]!r}")
        if sum(c.isdigit() for c in text) > MAX_DIGITS:
            raise ValueError(f"number literal with more than {MAX_DIGITS} digits")
        return Fraction(text)


def _bits(x: Fraction) -> int:
    return max(x.numerator.bit_length(), x.denominator.bit_length())


def _bounded(x: Fraction) -> Fraction:
    if _bits(x) > MAX_VALUE_BITS:
        raise ValueError(f"intermediate value larger than {MAX_VALUE_BITS} bits")
    return x


def _bounded_pow(base: Fraction, exponent: Fraction) -> Fraction:
    """base ** exponent, refused before computing when the exponent or the result is too big."""
    if exponent.denominator != 1:
        raise ValueError("non-integer exponent")
    e = exponent.numerator
    if abs(e) > MAX_POW_EXPONENT:
        raise ValueError(f"exponent larger than {MAX_POW_EXPONENT}")
    if base == 0 and e < 0:
        raise ValueError("division by zero")
    if _bits(base) * abs(e) > MAX_VALUE_BITS:
        raise ValueError(f"power larger than {MAX_VALUE_BITS} bits")
    return base**e


def _evaluate(source: str, tree: ast.Expression, allow_pow: bool, deadline: float) -> Fraction:
    try:
        return _Evaluator(source, allow_pow, deadline)(tree)
    except (RecursionError, MemoryError):  # unreachable within MAX_NODES; kept as a backstop
        raise ValueError("expression too complex") from None


def safe_arith(expr: str, allow_pow: bool = False, deadline_s: float = DEADLINE_S) -> Fraction:
    """Exact value of an expression made of decimal literals, + - * / ( ), unary +/- and, if
    `allow_pow`, small integer powers. Raises ValueError for anything else (names, calls, ...),
    division by zero, inputs over the size limits, or when `deadline_s` seconds pass."""
    deadline = _clock() + deadline_s
    source, tree = _parse_arith(expr, allow_pow)
    return _evaluate(source, tree, allow_pow, deadline)


def countdown_numbers_used(expr: str) -> list[int]:
    """The integer literals of `expr`, left to right ("(44 + 19) * 35" -> [44, 19, 35]).
    Raises ValueError when `expr` is not an allowed expression or has a non-integer literal."""
    source, tree = _parse_arith(expr, allow_pow=False)
    constants = sorted((n for n in ast.walk(tree) if isinstance(n, ast.Constant)),
                       key=lambda n: n.col_offset)
    numbers = []
    for node in constants:
        text = source[node.col_offset : node.end_col_offset]
        if not text.isascii() or not text.isdigit():
            raise ValueError(f"non-integer literal {text[:20]!r}")
        numbers.append(int(text))
    return numbers


# ----------------------------------------------------------------------------------------------
# Countdown
# ----------------------------------------------------------------------------------------------

_ANSWER_TAG = re.compile(r"<(/?)answer>", re.IGNORECASE)


def _last_answer_tag(text: str) -> str | None:
    """Content of the last complete <answer>...</answer> pair."""
    open_end, found = None, None
    for m in _ANSWER_TAG.finditer(text):
        if not m.group(1):
            open_end = m.end()
        elif open_end is not None:
            found, open_end = text[open_end : m.start()], None
    return found


def _extract_equation(text: str) -> str | None:
    tail = text[-MAX_TEXT_CHARS:]
    equation = _last_answer_tag(tail)
    if equation is None:
        equation = _last_answer_line(tail)
    if equation is None:
        return None
    equation = equation.strip().strip("$").strip().rstrip(".").strip()
    boxed = _ONLY_BOXED.fullmatch(equation)
    if boxed:
        equation = boxed.group(1).strip()
    return equation if 0 < len(equation) <= MAX_EXPR_CHARS else None


def verify_countdown(text: str, numbers: list[int], target: int) -> Verdict:
    """Check a Countdown answer: the equation in the last <answer>...</answer>, else on the last
    "Answer:" line, optionally ending in "= target". format_ok: it parses under the allow-list.
    correct: it uses each of `numbers` exactly once and no other literal, and equals `target`."""
    try:
        if not isinstance(text, str):
            return _FAIL
        equation = _extract_equation(text)
        if equation is None:
            return _FAIL
        lhs, eq_sign, rhs = equation.rpartition("=")
        if eq_sign and parse_number(rhs) == target:  # "(44 + 19) + 35 = 98" -> "(44 + 19) + 35"
            equation = lhs.strip()
        try:
            source, tree = _parse_arith(equation, allow_pow=False)
        except ValueError:
            return Verdict(format_ok=False, correct=False, answer=equation)
        try:
            used = countdown_numbers_used(equation)
            value = _evaluate(source, tree, False, _clock() + DEADLINE_S)
        except ValueError:  # a decimal literal, division by zero, ...
            return Verdict(format_ok=True, correct=False, answer=equation)
        correct = sorted(used) == sorted(int(n) for n in numbers) and value == target
        return Verdict(format_ok=True, correct=correct, answer=equation)
    except Exception:  # a verifier bug must cost one reward, not the training run
        if _RAISE_INTERNAL_ERRORS:
            raise
        return _FAIL
