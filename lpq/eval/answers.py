"""Final-answer extraction and comparison for generative tasks (GSM8K `####`, MATH `\\boxed{}`).

Greedy generations of small or quantized models are messy: the answer may be after `####`, after
"The answer is", only the last number, or inside nested braces. Extraction here is deliberately
tolerant, and comparison is numeric where both sides are numbers, so formatting noise (`$1,000.00`
vs `1000`) is never counted as a quality loss.
"""
from __future__ import annotations

import re
from fractions import Fraction

_NUMBER = re.compile(r"-?\$?\s?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def clean_number(text: str) -> str:
    """'$1,234.50' -> '1234.5'; '18.00' -> '18'; leaves non-numbers stripped but otherwise as they are."""
    s = text.strip().rstrip(".").replace("$", "").replace(",", "").replace(" ", "")
    try:
        value = Fraction(s)
    except (ValueError, ZeroDivisionError):
        return text.strip()
    if value.denominator == 1:
        return str(value.numerator)
    return s.rstrip("0") if "." in s else s


def gsm8k_target(answer: str) -> str:
    """The reference number of a GSM8K `answer` field (text after the last '####')."""
    if "####" not in answer:
        raise ValueError(f"GSM8K answer without '####': {answer[-80:]!r}")
    return clean_number(answer.rsplit("####", 1)[1])


def extract_gsm8k(response: str) -> str:
    """The model's final number: after the last '####', else after the last 'answer is', else the last number."""
    for marker in ("####", "answer is", "Answer:"):
        if marker in response:
            tail = response.rsplit(marker, 1)[1]
            m = _NUMBER.search(tail)
            if m:
                return clean_number(m.group(0))
    numbers = _NUMBER.findall(response)
    return clean_number(numbers[-1]) if numbers else ""


def numbers_equal(a: str, b: str) -> bool:
    try:
        return Fraction(clean_number(a)) == Fraction(clean_number(b))
    except (ValueError, ZeroDivisionError):
        return clean_number(a) == clean_number(b) != ""


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced; `\\boxed 5` also accepted."""
    starts = [m for m in re.finditer(r"\\(?:boxed|fbox)\s*", text)]
    for m in reversed(starts):
        i = m.end()
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1:j]
            continue  # unbalanced: try an earlier one
        word = re.match(r"[^\s$]+", text[i:])
        if word:
            return word.group(0)
    return None


def extract_math(response: str) -> str:
    """The final answer of a MATH solution: the last \\boxed{}, else what follows 'answer is'."""
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed
    m = re.findall(r"answer is[:\s]*\$?([^$\n]+?)\$?\s*(?:\.\s*)?(?:$|\n)", response)
    return m[-1].strip() if m else ""


def _unwrap_text(s: str) -> str:
    # Units after a number ("5\text{ cm}") are dropped; other \text{X} become X ("\text{Evelyn}").
    s = re.sub(r"(\d)\s*\\(?:text|textbf|mbox|mathrm)\{\s*[a-zA-Z ]+\}", r"\1", s)
    return re.sub(r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}", r"\1", s)


def normalize_math(answer: str) -> str:
    """A canonical string for a MATH answer so that equivalent spellings compare equal."""
    s = answer.strip()
    s = _unwrap_text(s)
    for old, new in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\:", ""),
                     ("\\ ", ""), ("dfrac", "frac"), ("tfrac", "frac"), ("^\\circ", ""), ("^{\\circ}", ""),
                     ("\\%", ""), ("%", ""), ("$", ""), ("\\displaystyle", "")):
        s = s.replace(old, new)
    s = s.replace(" ", "").rstrip(".")
    # "x=5" or "k = 5": keep the value; longer left sides are part of the answer (equations).
    m = re.fullmatch(r"[a-zA-Z]\w?=(.+)", s)
    if m:
        s = m.group(1)
    # \frac12 -> \frac{1}{2}, \frac1{x} -> \frac{1}{x}, \sqrt2 -> \sqrt{2}
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    if re.fullmatch(r"-?\.\d+", s):
        s = s.replace(".", "0.", 1)
    if re.fullmatch(r"\{.*\}", s) and s.count("{") == 1:
        s = s[1:-1]
    return s


def _as_number(s: str) -> Fraction | None:
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}", s)
    try:
        if m:
            value = Fraction(int(m.group(2)), int(m.group(3)))
            return -value if m.group(1) else value
        if re.fullmatch(r"-?\d+(\.\d+)?(/\d+)?", s):
            return Fraction(s)
    except ZeroDivisionError:
        return None
    return None


def math_equal(prediction: str, reference: str) -> bool:
    """Equal after normalization, or the same rational number (0.5 == \\frac{1}{2})."""
    p, r = normalize_math(prediction), normalize_math(reference)
    if not p:
        return False
    if p == r:
        return True
    pn, rn = _as_number(p), _as_number(r)
    return pn is not None and rn is not None and pn == rn
