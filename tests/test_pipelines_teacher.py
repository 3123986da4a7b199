"""pipelines.teacher, the shards step: the training-shard plan (fixed rows per file, order kept). The
teacher math itself (canvas, decode): test_teacher_canvas.py and test_teacher_decode.py (breen.teacher);
the step end to end: test_prepare_e2e.py."""

from __future__ import annotations

import pytest

from pipelines.teacher import plan


@pytest.mark.parametrize(("counts", "rows"), [([("a", 5), ("b", 0), ("c", 7)], 4), ([("a", 8)], 4), ([], 3)])
def test_shard_plan_has_fixed_rows_per_file(counts, rows):
    files = plan(counts, rows)
    sizes = [sum(n for _, _, n in f) for f in files]
    total = sum(n for _, n in counts)
    assert sum(sizes) == total
    assert all(s == rows for s in sizes[:-1]) and (not sizes or 0 < sizes[-1] <= rows)
    flat = [(name, o + i) for f in files for name, o, n in f for i in range(n)]
    assert flat == [(name, i) for name, n in counts for i in range(n)]  # order preserved, nothing twice
