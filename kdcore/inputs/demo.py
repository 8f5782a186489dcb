"""The generated demo corpus: short texts whose difficulty level (0..4) is known by construction.

It lets a run (and the tests) check a difficulty scorer without any downloaded data: a small
language model's per-sample loss rises with the level, so a scorer's difficulty should correlate
with it. Every text is plain ASCII of 120–160 characters (copy tasks: 103–123, so the repeat
always fits a 128-byte sample), and the corpus is a pure function of ``(n, seed)``.

Levels, from near-trivial to hard (mean per-sample loss of the default 4-layer byte-level GPT-2
teacher after 300 steps on 2000 samples, nats/byte: 0.5, 1.4, 2.0, 3.3, 4.6; Spearman 0.96):

0. **repetition** – one of ten short patterns with disjoint letters, repeated from a random phase
   (``"mnomnomno..."``): after the first character the previous one determines the next.
1. **counting** – consecutive integers from a random start, step 1, 2 or 10
   (``"417 418 419 420 ..."``): locally predictable, a model must learn to increment.
2. **templates** – sentences from one template and small word lists (``"the red cat sees a
   small bird near the river. ..."``): each word choice carries 1–3 nats, the rest is fixed.
3. **copy** – a random lowercase string of 50–60 letters, ``" | "``, then the same string again:
   the first half is incompressible (ln 26 nats/char); the second half can only be predicted by
   copying from ~60 positions back, which a small model learns late, if at all.
4. **noise** – uniformly random printable ASCII (ln 95 ≈ 4.55 nats/char): nothing to learn.

A compressor sees the copy task as easier than the templates (it copies perfectly), a small LM
does not; the levels are ordered for the LM.
"""

from __future__ import annotations

import random
import string

LEVELS = 5
LEVEL_NAMES = ("repetition", "counting", "templates", "copy", "noise")

_MIN_LEN, _MAX_LEN = 120, 160

_ADJ = ("red", "big", "old", "small", "happy", "quiet", "green", "fast")
_NOUN = ("cat", "dog", "bird", "child", "farmer", "horse", "teacher", "fox")
_VERB = ("sees", "likes", "finds", "helps", "follows", "calls", "feeds", "meets")
_DET = ("the", "a")
_PLACE = ("in the garden", "near the river", "at home", "on the hill", "by the road")
# Disjoint letters: the previous character alone determines the next one.
_PATTERNS = ("ab", "cde", "fg", "hij", "kl", "mno", "pq", "rst", "uv", "wxyz")
_COPY_ALPHABET = string.ascii_lowercase
_NOISE_ALPHABET = string.ascii_letters + string.digits + string.punctuation + " "


def _fill(rng: random.Random, piece) -> str:
    """Concatenate ``piece(rng)`` until a random target length is reached, then trim to it."""
    target = rng.randint(_MIN_LEN, _MAX_LEN)
    out = ""
    while len(out) < target:
        out += piece(rng)
    return out[:target]


def _repetition(rng: random.Random) -> str:
    pattern = rng.choice(_PATTERNS)
    phase = rng.randrange(len(pattern))
    pattern = pattern[phase:] + pattern[:phase]
    return _fill(rng, lambda _: pattern)


def _counting(rng: random.Random) -> str:
    start, step = rng.randint(0, 900), rng.choice((1, 1, 2, 10))
    numbers = iter(range(start, start + 10_000 * step, step))
    return _fill(rng, lambda _: f"{next(numbers)} ")


def _sentence(rng: random.Random) -> str:
    return (
        f"{rng.choice(_DET)} {rng.choice(_ADJ)} {rng.choice(_NOUN)} {rng.choice(_VERB)} "
        f"{rng.choice(_DET)} {rng.choice(_ADJ)} {rng.choice(_NOUN)} {rng.choice(_PLACE)}. "
    )


def _templates(rng: random.Random) -> str:
    return _fill(rng, _sentence)


def _copy(rng: random.Random) -> str:
    # 2 * 60 + 3 <= 123 characters: the whole task fits in one 128-byte sample.
    key = "".join(rng.choice(_COPY_ALPHABET) for _ in range(rng.randint(50, 60)))
    return f"{key} | {key}"


def _noise(rng: random.Random) -> str:
    return _fill(rng, lambda r: r.choice(_NOISE_ALPHABET))


_GENERATORS = (_repetition, _counting, _templates, _copy, _noise)


def generate_demo_corpus(n: int, seed: int) -> list[tuple[str, int]]:
    """``n`` shuffled ``(text, level)`` pairs, levels 0..4 as even as ``n`` allows.

    Deterministic in ``(n, seed)``: it uses its own ``random.Random(seed)``, never global state.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    levels = [i % LEVELS for i in range(n)]
    rng.shuffle(levels)
    return [(_GENERATORS[level](rng), level) for level in levels]
