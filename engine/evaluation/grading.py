"""Answer extraction and equivalence for math benchmarks.

`extract_answer` takes the last \\boxed{...} / \\fbox{...} (nested braces included), else the last number.
`is_equivalent` tries, cheapest first: normalised string equality, exact numeric equality (ints, decimals,
fractions, \\frac, percentages, thousands separators), then HF math-verify for symbolic forms. It never
raises and is time-bounded: math-verify runs under its own SIGALRM timeout in the main thread; elsewhere
(where signals are unavailable and nothing can interrupt sympy) only short inputs without huge powers or
factorials are handed to it: a 9-character tower 9^{9^{9}} alone makes sympy compute 9^(9^9) exactly.
"""
from __future__ import annotations

import logging
import re
import threading
from fractions import Fraction

MINUS = "\u2212"  # the typeset minus sign, which a model may write for "-"
_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*")
# A number as people write it: optional sign, thousands groups or plain digits, optional decimals.
_NUMBER_RE = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")
_FRAC_RE = re.compile(r"^(-?)\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}$")
_FRAC_SHORT_RE = re.compile(r"^(-?)\\[dt]?frac(\d)(\d)$")
_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_THOUSANDS_RE = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")

# what sympy may evaluate to a number too large to finish, refused where no timeout can stop it: an exponent
# or factorial of 4+ digits, a factorial of a group, binomials, products, sums, Python's power
_UNBOUNDED_RE = re.compile(r"\^\s*\{?\s*-?\d{4,}|\d{4,}\s*!|[)}\]]\s*!|\\(?:binom|choose|prod|sum)|\*\*")

_MATH_VERIFY_TIMEOUT_S = 2
_MAX_SYMBOLIC_CHARS = 300  # longer strings are not worth a sympy parse (and risk unbounded time)

logging.getLogger("math_verify").setLevel(logging.ERROR)


def _braced(text: str, start: int) -> str | None:
    """The content of the brace group opening at text[start] == '{', or None when it never closes."""
    depth = 0
    for i in range(start, len(text)):
        ch = text[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i]
    return None


def extract_answer(text: str) -> str | None:
    """The content of the last complete, non-empty \\boxed{...} or \\fbox{...}; failing that, the last number."""
    if not text:
        return None
    for match in reversed(list(_BOX_RE.finditer(text))):
        end = match.end()
        if end < len(text) and text[end] == "{":
            content = _braced(text, end)
            if content is not None and content.strip():  # an empty box (an echoed instruction) answers nothing
                return content.strip()
        else:  # "\boxed 5": the argument runs to the next space or dollar sign
            bare = re.match(r"[^\s$]+", text[end:])
            if bare:
                return bare.group(0)
    numbers = _NUMBER_RE.findall(text.replace(MINUS, "-"))
    return numbers[-1] if numbers else None


def normalize(answer: str) -> str:
    """A canonical spelling: "-" for the minus sign U+2212, no math delimiters, spacing, \\left/\\right,
    \\text wrappers, trailing dots, degree signs, a number's plus sign or thousands separators (1{,}000
    too); \\dfrac/\\tfrac become \\frac and \\% becomes %."""
    s = answer.strip().replace(MINUS, "-")
    s = s.replace("\\$", "").replace("$", "")
    s = s.replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\ ", "")
    s = s.replace("\\left", "").replace("\\right", "").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("^\\circ", "").replace("^{\\circ}", "").replace("°", "")
    s = _TEXT_RE.sub(r"\1", s)
    s = re.sub(r"\s+", "", s).rstrip(".").replace("{,}", ",").replace("\\%", "%")
    if re.match(r"\+[\d.]", s):  # +3 is 3
        s = s[1:]
    if _THOUSANDS_RE.match(s):
        s = s.replace(",", "")
    return s


def _to_fraction(s: str) -> Fraction | None:
    """An exact rational for ints, decimals, a/b and \\frac{a}{b} spellings; None for anything else."""
    try:
        m = _FRAC_RE.match(s) or _FRAC_SHORT_RE.match(s)
        if m:
            sign = -1 if m.group(1) else 1
            return sign * Fraction(m.group(2)) / Fraction(m.group(3))
        if re.fullmatch(r"-?\d+(?:\.\d+)?(?:/-?\d+(?:\.\d+)?)?|-?\.\d+", s):
            num, _, den = s.partition("/")
            return Fraction(num) / Fraction(den) if den else Fraction(num)
    except (ValueError, ZeroDivisionError):
        return None
    return None


def _numeric_values(s: str) -> list[Fraction]:
    """Values a normalised answer may denote. A percentage denotes both x and x/100, as graders of the
    MATH family do ("50\\%" matches both 50 and 0.5)."""
    stripped = s.replace("\\%", "").replace("%", "")
    value = _to_fraction(stripped)
    if value is None:
        return []
    return [value, value / 100] if stripped != s else [value]


def canonical_key(answer: str | None) -> str | None:
    """A hashable key under which equal answers collide (used for majority voting): the exact rational
    value for numbers, else the normalised string."""
    if answer is None:
        return None
    s = normalize(answer)
    if not s:  # as is_equivalent: an answer that normalises to nothing is no answer
        return None
    values = _numeric_values(s)
    if values and "%" not in s:
        return f"#{values[0]}"
    return s


def _unbounded(s: str) -> bool:
    """Whether sympy might compute a huge exact number from ``s``: _UNBOUNDED_RE, or a power or factorial
    inside an exponent (9^{9^{9}} is 9^387420489)."""
    if _UNBOUNDED_RE.search(s):
        return True
    for match in re.finditer(r"\^\s*\{", s):
        inner = _braced(s, match.end() - 1)
        if inner is None or "^" in inner or "!" in inner:
            return True
    return False


def _symbolic_equal(pred: str, truth: str) -> bool:
    """math-verify's comparison; False on any failure, parse error or timeout."""
    in_main = threading.current_thread() is threading.main_thread()
    if not in_main and (max(len(pred), len(truth)) > _MAX_SYMBOLIC_CHARS // 3 or _unbounded(pred)
                        or _unbounded(truth)):
        return False
    from math_verify import parse, verify

    timeout = _MATH_VERIFY_TIMEOUT_S if in_main else None
    gold = parse(f"${truth}$", parsing_timeout=timeout)
    target = parse(f"${pred}$", parsing_timeout=timeout)
    if not gold or not target:
        return False
    return bool(verify(gold, target, timeout_seconds=timeout))


def is_equivalent(pred: str | None, truth: str | None) -> bool:
    """True when the predicted answer denotes the ground truth. Never raises."""
    try:
        if pred is None or truth is None:
            return False
        p, t = normalize(str(pred)), normalize(str(truth))
        if not p or not t:
            return False
        if p == t:
            return True
        pv, tv = _numeric_values(p), _numeric_values(t)
        if pv and tv:
            return any(a == b for a in pv for b in tv)
        if max(len(p), len(t)) > _MAX_SYMBOLIC_CHARS:
            return False
        return _symbolic_equal(p, t)
    except Exception:  # noqa: BLE001 - grading must never take a run down; a failure means "not equal"
        return False


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k).

    Evaluated as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms a binomial coefficient and so
    stays exact to rounding for n in the thousands."""
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong
