"""The number formatters every table uses (kdcore.formats)."""

from __future__ import annotations

import math

from kdcore.formats import MISSING, fixed, human_bytes, mean_sd, significant


def test_fixed_and_significant_digits():
    assert fixed(12.34567) == "12.346" and fixed(8774.6, 0) == "8775" and fixed(None) == MISSING
    assert significant(123.456789) == "123.457" and significant(0.000123456, 4) == "0.0001235"
    assert significant(12345.0, 4) == "1.234e+04"  # as the model card shows large token counts
    assert significant(7) == "7" and significant(True) == "true" and significant("gpt2") == "gpt2"
    assert significant(math.nan) == "nan" and significant(None) == MISSING


def test_mean_sd_with_and_without_an_sd():
    assert mean_sd(153.7451, 1.8559) == "153.745 ± 1.856"
    assert mean_sd(153.7451, None) == "153.745"  # one seed: no sd
    assert mean_sd(None, None) == MISSING
    assert mean_sd(153.7451, 1.8559, significant) == "153.745 ± 1.8559"


def test_human_bytes():
    assert human_bytes(512) == "512 B" and human_bytes(1536) == "1.5 KiB"
    assert human_bytes(3 * 2**30) == "3.0 GiB" and human_bytes(None) == "?"
