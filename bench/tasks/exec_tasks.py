"""Execution-based infill tasks: small Python functions with tests, written by hand for dlm-ls.

Data, not a module of the package: `bench/execution.py` reads `TASKS` with runpy. Each task:

  name    unique id
  source  the program (stdlib only; a module docstring-free snippet of one or two functions)
  test    a `check()` function; it raises AssertionError when the program is wrong
  holes   where to punch holes, by text so the positions survive edits:
            line   the stripped text of one line (must be unique): the middle is that line,
                   indentation left in the prefix
            block  [first, last]: stripped texts of a block's first and last line
            span   a substring that occurs once in the source: the middle, character exact

The tests check every hole: with the true middle the test passes; with an empty middle it fails
(tests/test_bench.py enforces both). Written for this repository; not taken from any benchmark.
"""

TASKS = [
    {
        "name": "clamp",
        "source": '''def clamp(x, lo, hi):
    """Limit x to the closed interval [lo, hi]."""
    if lo > hi:
        raise ValueError("empty interval")
    if x < lo:
        return lo
    if x > hi:
        return hi
    return x
''',
        "test": '''def check():
    assert clamp(5, 0, 10) == 5
    assert clamp(-3, 0, 10) == 0
    assert clamp(12, 0, 10) == 10
    assert clamp(0, 0, 0) == 0
    try:
        clamp(1, 2, 1)
    except ValueError:
        pass
    else:
        raise AssertionError("no error for an empty interval")
''',
        "holes": {"line": "return hi", "block": ["if x < lo:", "return hi"], "span": "x > hi"},
    },
    {
        "name": "running_mean",
        "source": '''def running_mean(xs):
    """The mean of the first k items, for every k."""
    out = []
    total = 0.0
    for i, x in enumerate(xs, 1):
        total += x
        out.append(total / i)
    return out
''',
        "test": '''def check():
    assert running_mean([]) == []
    assert running_mean([2, 4, 6]) == [2.0, 3.0, 4.0]
    assert running_mean([1]) == [1.0]
''',
        "holes": {"line": "total += x", "block": ["total += x", "out.append(total / i)"], "span": "total / i"},
    },
    {
        "name": "word_counts",
        "source": '''def word_counts(text):
    """How often each lower-cased word occurs; words are split on whitespace."""
    counts = {}
    for word in text.lower().split():
        counts[word] = counts.get(word, 0) + 1
    return counts
''',
        "test": '''def check():
    assert word_counts("") == {}
    assert word_counts("a b A") == {"a": 2, "b": 1}
    assert word_counts("The cat the  hat") == {"the": 2, "cat": 1, "hat": 1}
''',
        "holes": {"line": "counts[word] = counts.get(word, 0) + 1",
                  "block": ["for word in text.lower().split():", "counts[word] = counts.get(word, 0) + 1"],
                  "span": "counts.get(word, 0)"},
    },
    {
        "name": "is_palindrome",
        "source": '''def is_palindrome(s):
    """True when s reads the same both ways, ignoring case and anything but letters and digits."""
    chars = [c.lower() for c in s if c.isalnum()]
    return chars == chars[::-1]
''',
        "test": '''def check():
    assert is_palindrome("A man, a plan, a canal: Panama")
    assert is_palindrome("")
    assert not is_palindrome("abc")
    assert is_palindrome("No 'x' in Nixon")
''',
        "holes": {"line": "return chars == chars[::-1]",
                  "block": ["chars = [c.lower() for c in s if c.isalnum()]", "return chars == chars[::-1]"],
                  "span": "if c.isalnum()"},
    },
    {
        "name": "flatten",
        "source": '''def flatten(items):
    """Flatten arbitrarily nested lists and tuples into one list."""
    out = []
    for item in items:
        if isinstance(item, (list, tuple)):
            out.extend(flatten(item))
        else:
            out.append(item)
    return out
''',
        "test": '''def check():
    assert flatten([]) == []
    assert flatten([1, [2, [3, (4, 5)]], 6]) == [1, 2, 3, 4, 5, 6]
    assert flatten(["ab", ["c"]]) == ["ab", "c"]
''',
        "holes": {"line": "out.extend(flatten(item))",
                  "block": ["if isinstance(item, (list, tuple)):", "out.append(item)"],
                  "span": "isinstance(item, (list, tuple))"},
    },
    {
        "name": "chunks",
        "source": '''def chunks(xs, n):
    """Split xs into lists of n items; the last one may be shorter."""
    if n < 1:
        raise ValueError("n must be positive")
    return [xs[i:i + n] for i in range(0, len(xs), n)]
''',
        "test": '''def check():
    assert chunks([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]
    assert chunks([], 3) == []
    assert chunks([1, 2], 5) == [[1, 2]]
    try:
        chunks([1], 0)
    except ValueError:
        pass
    else:
        raise AssertionError("n = 0 accepted")
''',
        "holes": {"line": "return [xs[i:i + n] for i in range(0, len(xs), n)]",
                  "block": ["if n < 1:", "return [xs[i:i + n] for i in range(0, len(xs), n)]"],
                  "span": "range(0, len(xs), n)"},
    },
    {
        "name": "fizzbuzz",
        "source": '''def fizzbuzz(n):
    """The words of FizzBuzz from 1 to n."""
    words = []
    for i in range(1, n + 1):
        if i % 15 == 0:
            words.append("FizzBuzz")
        elif i % 3 == 0:
            words.append("Fizz")
        elif i % 5 == 0:
            words.append("Buzz")
        else:
            words.append(str(i))
    return words
''',
        "test": '''def check():
    assert fizzbuzz(5) == ["1", "2", "Fizz", "4", "Buzz"]
    assert fizzbuzz(15)[-1] == "FizzBuzz"
    assert fizzbuzz(0) == []
''',
        "holes": {"line": "words.append(str(i))", "block": ["elif i % 5 == 0:", "words.append(str(i))"],
                  "span": "i % 15 == 0"},
    },
    {
        "name": "gcd",
        "source": '''def gcd(a, b):
    """Greatest common divisor of two integers (non-negative result)."""
    a, b = abs(a), abs(b)
    while b:
        a, b = b, a % b
    return a
''',
        "test": '''def check():
    assert gcd(12, 18) == 6
    assert gcd(-4, 6) == 2
    assert gcd(7, 0) == 7
    assert gcd(17, 5) == 1
''',
        "holes": {"line": "a, b = b, a % b", "block": ["while b:", "a, b = b, a % b"], "span": "b, a % b"},
    },
    {
        "name": "primes_below",
        "source": '''def primes_below(n):
    """All primes p < n, by the sieve of Eratosthenes."""
    if n < 3:
        return []
    sieve = [True] * n
    sieve[0] = sieve[1] = False
    for p in range(2, int(n ** 0.5) + 1):
        if sieve[p]:
            for q in range(p * p, n, p):
                sieve[q] = False
    return [i for i, is_prime in enumerate(sieve) if is_prime]
''',
        "test": '''def check():
    assert primes_below(2) == []
    assert primes_below(3) == [2]
    assert primes_below(20) == [2, 3, 5, 7, 11, 13, 17, 19]
    assert len(primes_below(1000)) == 168
''',
        "holes": {"line": "sieve[q] = False", "block": ["if sieve[p]:", "sieve[q] = False"],
                  "span": "range(p * p, n, p)"},
    },
    {
        "name": "binary_search",
        "source": '''def binary_search(xs, target):
    """Index of target in the sorted list xs, or -1."""
    lo, hi = 0, len(xs) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        if xs[mid] == target:
            return mid
        if xs[mid] < target:
            lo = mid + 1
        else:
            hi = mid - 1
    return -1
''',
        "test": '''def check():
    xs = [1, 3, 5, 7, 9, 11]
    for i, x in enumerate(xs):
        assert binary_search(xs, x) == i
    assert binary_search(xs, 4) == -1
    assert binary_search([], 1) == -1
    assert binary_search(xs, 12) == -1
''',
        "holes": {"line": "mid = (lo + hi) // 2", "block": ["if xs[mid] < target:", "hi = mid - 1"],
                  "span": "lo <= hi"},
    },
    {
        "name": "merge_sorted",
        "source": '''def merge_sorted(a, b):
    """Merge two sorted lists into one sorted list."""
    out = []
    i = j = 0
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
            out.append(a[i])
            i += 1
        else:
            out.append(b[j])
            j += 1
    out.extend(a[i:])
    out.extend(b[j:])
    return out
''',
        "test": '''def check():
    assert merge_sorted([1, 4, 6], [2, 3, 7, 8]) == [1, 2, 3, 4, 6, 7, 8]
    assert merge_sorted([], [1]) == [1]
    assert merge_sorted([2], []) == [2]
    assert merge_sorted([1, 1], [1]) == [1, 1, 1]
''',
        "holes": {"line": "out.extend(b[j:])", "block": ["if a[i] <= b[j]:", "j += 1"],
                  "span": "i < len(a) and j < len(b)"},
    },
    {
        "name": "rle_encode",
        "source": '''def rle_encode(s):
    """Run-length encoding: "aaab" -> [("a", 3), ("b", 1)]."""
    runs = []
    for ch in s:
        if runs and runs[-1][0] == ch:
            runs[-1] = (ch, runs[-1][1] + 1)
        else:
            runs.append((ch, 1))
    return runs
''',
        "test": '''def check():
    assert rle_encode("") == []
    assert rle_encode("aaab") == [("a", 3), ("b", 1)]
    assert rle_encode("abba") == [("a", 1), ("b", 2), ("a", 1)]
''',
        "holes": {"line": "runs[-1] = (ch, runs[-1][1] + 1)",
                  "block": ["if runs and runs[-1][0] == ch:", "runs.append((ch, 1))"],
                  "span": "runs[-1][0] == ch"},
    },
    {
        "name": "rle_decode",
        "source": '''def rle_decode(runs):
    """Inverse of run-length encoding: [("a", 3), ("b", 1)] -> "aaab"."""
    parts = []
    for ch, count in runs:
        if count < 0:
            raise ValueError("negative count")
        parts.append(ch * count)
    return "".join(parts)
''',
        "test": '''def check():
    assert rle_decode([]) == ""
    assert rle_decode([("a", 3), ("b", 1)]) == "aaab"
    assert rle_decode([("x", 0), ("y", 2)]) == "yy"
    try:
        rle_decode([("a", -1)])
    except ValueError:
        pass
    else:
        raise AssertionError("negative count accepted")
''',
        "holes": {"line": "parts.append(ch * count)", "block": ["if count < 0:", "parts.append(ch * count)"],
                  "span": '"".join(parts)'},
    },
    {
        "name": "transpose",
        "source": '''def transpose(matrix):
    """Rows become columns; every row must have the same length."""
    if not matrix:
        return []
    width = len(matrix[0])
    if any(len(row) != width for row in matrix):
        raise ValueError("ragged matrix")
    return [[row[c] for row in matrix] for c in range(width)]
''',
        "test": '''def check():
    assert transpose([]) == []
    assert transpose([[1, 2, 3], [4, 5, 6]]) == [[1, 4], [2, 5], [3, 6]]
    assert transpose([[1]]) == [[1]]
    try:
        transpose([[1, 2], [3]])
    except ValueError:
        pass
    else:
        raise AssertionError("ragged matrix accepted")
''',
        "holes": {"line": "return [[row[c] for row in matrix] for c in range(width)]",
                  "block": ["width = len(matrix[0])", "raise ValueError(\"ragged matrix\")"],
                  "span": "[row[c] for row in matrix]"},
    },
    {
        "name": "dedupe",
        "source": '''def dedupe(items):
    """Drop repeated items, keeping the first occurrence and the order."""
    seen = set()
    out = []
    for item in items:
        if item not in seen:
            seen.add(item)
            out.append(item)
    return out
''',
        "test": '''def check():
    assert dedupe([3, 1, 3, 2, 1]) == [3, 1, 2]
    assert dedupe([]) == []
    assert dedupe("abca") == ["a", "b", "c"]
''',
        "holes": {"line": "seen.add(item)", "block": ["if item not in seen:", "out.append(item)"],
                  "span": "item not in seen"},
    },
    {
        "name": "parse_pairs",
        "source": '''def parse_pairs(text):
    """Parse "a=1; b=2" into {"a": "1", "b": "2"}; blank entries are skipped."""
    result = {}
    for entry in text.split(";"):
        entry = entry.strip()
        if not entry:
            continue
        key, _, value = entry.partition("=")
        result[key.strip()] = value.strip()
    return result
''',
        "test": '''def check():
    assert parse_pairs("a=1; b=2") == {"a": "1", "b": "2"}
    assert parse_pairs("") == {}
    assert parse_pairs(" x = hello ;; y=") == {"x": "hello", "y": ""}
''',
        "holes": {"line": "key, _, value = entry.partition(\"=\")",
                  "block": ["key, _, value = entry.partition(\"=\")", "result[key.strip()] = value.strip()"],
                  "span": "entry.strip()"},
    },
    {
        "name": "caesar",
        "source": '''def caesar(text, shift):
    """Shift ASCII letters by `shift` places, keeping case; other characters stay."""
    out = []
    for ch in text:
        if "a" <= ch <= "z":
            out.append(chr((ord(ch) - ord("a") + shift) % 26 + ord("a")))
        elif "A" <= ch <= "Z":
            out.append(chr((ord(ch) - ord("A") + shift) % 26 + ord("A")))
        else:
            out.append(ch)
    return "".join(out)
''',
        "test": '''def check():
    assert caesar("abc", 1) == "bcd"
    assert caesar("xyz", 3) == "abc"
    assert caesar("Hello, World!", 13) == "Uryyb, Jbeyq!"
    assert caesar(caesar("Round Trip", 7), -7) == "Round Trip"
''',
        "holes": {"line": "out.append(chr((ord(ch) - ord(\"A\") + shift) % 26 + ord(\"A\")))",
                  "block": ["elif \"A\" <= ch <= \"Z\":", "out.append(ch)"],
                  "span": "(ord(ch) - ord(\"a\") + shift) % 26"},
    },
    {
        "name": "fibonacci",
        "source": '''def fibonacci(n):
    """The first n Fibonacci numbers, starting 0, 1."""
    out = []
    a, b = 0, 1
    for _ in range(n):
        out.append(a)
        a, b = b, a + b
    return out
''',
        "test": '''def check():
    assert fibonacci(0) == []
    assert fibonacci(1) == [0]
    assert fibonacci(8) == [0, 1, 1, 2, 3, 5, 8, 13]
''',
        "holes": {"line": "a, b = b, a + b", "block": ["out.append(a)", "a, b = b, a + b"], "span": "b, a + b"},
    },
    {
        "name": "count_vowels",
        "source": '''VOWELS = "aeiou"


def count_vowels(text):
    """Number of vowels in text, either case."""
    return sum(1 for ch in text.lower() if ch in VOWELS)
''',
        "test": '''def check():
    assert count_vowels("") == 0
    assert count_vowels("Hello World") == 3
    assert count_vowels("AEIOUxyz") == 5
''',
        "holes": {"line": "return sum(1 for ch in text.lower() if ch in VOWELS)",
                  "block": ["\"\"\"Number of vowels in text, either case.\"\"\"",
                            "return sum(1 for ch in text.lower() if ch in VOWELS)"],
                  "span": "if ch in VOWELS"},
    },
    {
        "name": "max_subarray",
        "source": '''def max_subarray(xs):
    """Largest sum of a non-empty contiguous run of xs (Kadane's algorithm)."""
    if not xs:
        raise ValueError("empty list")
    best = current = xs[0]
    for x in xs[1:]:
        current = max(x, current + x)
        best = max(best, current)
    return best
''',
        "test": '''def check():
    assert max_subarray([-2, 1, -3, 4, -1, 2, 1, -5, 4]) == 6
    assert max_subarray([-3, -1, -2]) == -1
    assert max_subarray([5]) == 5
    try:
        max_subarray([])
    except ValueError:
        pass
    else:
        raise AssertionError("empty list accepted")
''',
        "holes": {"line": "current = max(x, current + x)",
                  "block": ["current = max(x, current + x)", "best = max(best, current)"],
                  "span": "max(best, current)"},
    },
    {
        "name": "stack",
        "source": '''class Stack:
    """A last-in, first-out stack."""

    def __init__(self):
        self._items = []

    def push(self, item):
        self._items.append(item)

    def pop(self):
        if not self._items:
            raise IndexError("pop from an empty stack")
        return self._items.pop()

    def peek(self):
        return self._items[-1] if self._items else None

    def __len__(self):
        return len(self._items)
''',
        "test": '''def check():
    s = Stack()
    assert len(s) == 0 and s.peek() is None
    s.push(1)
    s.push(2)
    assert s.peek() == 2 and len(s) == 2
    assert s.pop() == 2 and s.pop() == 1
    try:
        s.pop()
    except IndexError:
        pass
    else:
        raise AssertionError("pop from an empty stack succeeded")
''',
        "holes": {"line": "return self._items[-1] if self._items else None",
                  "block": ["if not self._items:", "return self._items.pop()"],
                  "span": "self._items.append(item)"},
    },
    {
        "name": "roman_to_int",
        "source": '''ROMAN = {"I": 1, "V": 5, "X": 10, "L": 50, "C": 100, "D": 500, "M": 1000}


def roman_to_int(s):
    """Value of a Roman numeral such as "MCMXCIV"."""
    total = 0
    for i, ch in enumerate(s):
        value = ROMAN[ch]
        if i + 1 < len(s) and ROMAN[s[i + 1]] > value:
            total -= value
        else:
            total += value
    return total
''',
        "test": '''def check():
    assert roman_to_int("III") == 3
    assert roman_to_int("IV") == 4
    assert roman_to_int("MCMXCIV") == 1994
    assert roman_to_int("") == 0
''',
        "holes": {"line": "value = ROMAN[ch]", "block": ["if i + 1 < len(s) and ROMAN[s[i + 1]] > value:", "total += value"],
                  "span": "ROMAN[s[i + 1]] > value"},
    },
    {
        "name": "matmul",
        "source": '''def matmul(a, b):
    """Product of two matrices given as lists of rows."""
    if not a or not b or len(a[0]) != len(b):
        raise ValueError("shapes do not match")
    rows, inner, cols = len(a), len(b), len(b[0])
    out = [[0] * cols for _ in range(rows)]
    for i in range(rows):
        for j in range(cols):
            out[i][j] = sum(a[i][k] * b[k][j] for k in range(inner))
    return out
''',
        "test": '''def check():
    assert matmul([[1, 2], [3, 4]], [[5, 6], [7, 8]]) == [[19, 22], [43, 50]]
    assert matmul([[1, 2, 3]], [[1], [2], [3]]) == [[14]]
    try:
        matmul([[1, 2]], [[1, 2]])
    except ValueError:
        pass
    else:
        raise AssertionError("shape mismatch accepted")
''',
        "holes": {"line": "out[i][j] = sum(a[i][k] * b[k][j] for k in range(inner))",
                  "block": ["for i in range(rows):", "out[i][j] = sum(a[i][k] * b[k][j] for k in range(inner))"],
                  "span": "a[i][k] * b[k][j]"},
    },
    {
        "name": "group_by_initial",
        "source": '''def group_by_initial(words):
    """Group words by their first letter (lower-cased); empty words are skipped."""
    groups = {}
    for word in words:
        if not word:
            continue
        groups.setdefault(word[0].lower(), []).append(word)
    return groups
''',
        "test": '''def check():
    assert group_by_initial([]) == {}
    assert group_by_initial(["apple", "Avocado", "banana", ""]) == {"a": ["apple", "Avocado"], "b": ["banana"]}
''',
        "holes": {"line": "groups.setdefault(word[0].lower(), []).append(word)",
                  "block": ["if not word:", "groups.setdefault(word[0].lower(), []).append(word)"],
                  "span": "word[0].lower()"},
    },
    {
        "name": "snake_to_camel",
        "source": '''def snake_to_camel(name):
    """snake_case -> camelCase; leading underscores are kept."""
    stripped = name.lstrip("_")
    lead = name[: len(name) - len(stripped)]
    first, *rest = stripped.split("_")
    return lead + first + "".join(part.capitalize() for part in rest)
''',
        "test": '''def check():
    assert snake_to_camel("hello_world") == "helloWorld"
    assert snake_to_camel("_private_name") == "_privateName"
    assert snake_to_camel("x") == "x"
    assert snake_to_camel("a_b_c") == "aBC"
''',
        "holes": {"line": "lead = name[: len(name) - len(stripped)]",
                  "block": ["first, *rest = stripped.split(\"_\")",
                            "return lead + first + \"\".join(part.capitalize() for part in rest)"],
                  "span": "part.capitalize() for part in rest"},
    },
    {
        "name": "histogram",
        "source": '''def histogram(values, bins, lo, hi):
    """Counts of values in `bins` equal-width bins over [lo, hi); values outside are ignored."""
    counts = [0] * bins
    width = (hi - lo) / bins
    for v in values:
        if lo <= v < hi:
            index = int((v - lo) / width)
            counts[min(index, bins - 1)] += 1
    return counts
''',
        "test": '''def check():
    assert histogram([], 3, 0, 3) == [0, 0, 0]
    assert histogram([0, 0.5, 1, 2.9, 3, -1], 3, 0, 3) == [2, 1, 1]
    assert histogram([5, 6, 7], 2, 5, 7) == [1, 1]
''',
        "holes": {"line": "width = (hi - lo) / bins",
                  "block": ["if lo <= v < hi:", "counts[min(index, bins - 1)] += 1"],
                  "span": "int((v - lo) / width)"},
    },
    {
        "name": "balanced",
        "source": '''PAIRS = {")": "(", "]": "[", "}": "{"}


def balanced(text):
    """True when every bracket in text is closed in the right order."""
    stack = []
    for ch in text:
        if ch in "([{":
            stack.append(ch)
        elif ch in PAIRS:
            if not stack or stack.pop() != PAIRS[ch]:
                return False
    return not stack
''',
        "test": '''def check():
    assert balanced("")
    assert balanced("a(b[c]{d})")
    assert not balanced("(]")
    assert not balanced("((")
    assert not balanced(")")
''',
        "holes": {"line": "if not stack or stack.pop() != PAIRS[ch]:",
                  "block": ["elif ch in PAIRS:", "return False"],
                  "span": "return not stack"},
    },
    {
        "name": "rotate",
        "source": '''def rotate(xs, k):
    """Rotate a list k places to the right (negative k: to the left)."""
    if not xs:
        return []
    k %= len(xs)
    return xs[-k:] + xs[:-k] if k else list(xs)
''',
        "test": '''def check():
    assert rotate([1, 2, 3, 4], 1) == [4, 1, 2, 3]
    assert rotate([1, 2, 3, 4], -1) == [2, 3, 4, 1]
    assert rotate([1, 2, 3], 3) == [1, 2, 3]
    assert rotate([], 5) == []
    assert rotate([1, 2, 3], 5) == [2, 3, 1]
    assert rotate([1, 2, 3], -4) == [2, 3, 1]
''',
        "holes": {"line": "k %= len(xs)", "block": ["k %= len(xs)", "return xs[-k:] + xs[:-k] if k else list(xs)"],
                  "span": "xs[-k:] + xs[:-k]"},
    },
]
