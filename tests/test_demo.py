"""The generated demo corpus: deterministic, balanced, and harder with each level."""

from __future__ import annotations

import random
import statistics
import zlib
from collections import Counter

import pytest
from scipy.stats import spearmanr

from kdcore.inputs.demo import LEVEL_NAMES, LEVELS, generate_demo_corpus


@pytest.fixture(scope="module")
def corpus() -> list[tuple[str, int]]:
    return generate_demo_corpus(1000, seed=0)


def test_deterministic_by_seed_without_global_state():
    state = random.getstate()
    random.seed(123)
    first = generate_demo_corpus(200, seed=7)
    random.seed(456)
    second = generate_demo_corpus(200, seed=7)
    assert first == second
    assert generate_demo_corpus(200, seed=8) != first
    random.setstate(state)


def test_global_random_state_untouched():
    random.seed(5)
    expected = random.random()
    random.seed(5)
    generate_demo_corpus(50, seed=1)
    assert random.random() == expected


@pytest.mark.parametrize("n", [0, 7, 1000])
def test_levels_even_and_shuffled(n):
    pairs = generate_demo_corpus(n, seed=3)
    assert len(pairs) == n
    counts = Counter(level for _, level in pairs)
    assert set(counts) <= set(range(LEVELS))
    if n >= LEVELS:
        assert max(counts.values()) - min(counts.values()) <= 1
    levels = [level for _, level in pairs]
    if n >= 100:
        assert levels != sorted(levels)
        assert len(LEVEL_NAMES) == LEVELS


def test_texts_fill_a_128_byte_sample(corpus):
    lengths = [len(text) for text, _ in corpus]
    assert min(lengths) >= 100
    assert max(lengths) <= 200
    assert statistics.mean(lengths) >= 120
    assert all(text.isascii() for text, _ in corpus)


def test_copy_task_repeats_its_string(corpus):
    copies = [text for text, level in corpus if level == 3]
    assert copies
    for text in copies:
        first, second = text.split(" | ")
        assert first == second
        assert len(text) <= 128  # the copy fits one byte-level sample


def test_compressed_size_rises_with_level(corpus):
    ratios = [len(zlib.compress(text.encode(), 9)) / len(text) for text, _ in corpus]
    levels = [level for _, level in corpus]
    rho = spearmanr(ratios, levels).statistic
    assert rho > 0.7, rho
    means = [
        statistics.mean(r for r, lv in zip(ratios, levels, strict=True) if lv == k) for k in range(LEVELS)
    ]
    # repetition, counting, templates: strictly rising; noise is incompressible, repetition trivial.
    assert means[0] < means[1] < means[2]
    assert means[4] == max(means) and means[4] > 0.95
    assert means[0] == min(means) and means[0] < 0.2


def test_bad_n():
    with pytest.raises(ValueError):
        generate_demo_corpus(-1, seed=0)
