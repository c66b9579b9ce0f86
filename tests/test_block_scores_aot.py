"""Ahead-of-time gate of the block-score pass of the forward kernel (`return_block_scores`,
attncc.runtime.block_scores): the kernels launched with the pass on compile for sm_80 and
sm_90 without spills, within shared memory and with wgmma on sm_90; the default launch of the
same source (pass off, a constexpr) has the same registers and SASS as the source generated
without the pass.
"""
import os

import pytest

from attncc.runtime import aot

SPECS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "specs")
_MISSING = aot.ptxas_missing()
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=f"no AOT compile: {_MISSING}")

# closed-form loops, static CSR lists (natten2d with 1-D tiles), pre-pass lists, and score
# modifiers (alibi spills 16 B on sm_80 without the launch's maxnreg=255; t5_bias at head dim
# 128 spills 404 B on sm_90 with 4 warps). (The whole library: docs/BENCHMARKS.md.)
SPECS = ("causal", "natten2d", "seer_gate", "alibi")
CASES = [(s, a, mode, 64) for s in SPECS for a in (80, 90) for mode in ("max", "mean")] + \
        [("t5_bias", a, "mean", 128) for a in (80, 90)]
SAME = [(s, 90, "same", 64) for s in ("causal", "alibi")]

_REPORTS: dict = {}


def _reports(request, key, jobs_of):
    if key not in _REPORTS:
        wanted = []
        for item in request.session.items:
            cs = getattr(item, "callspec", None)
            if cs is not None and item.module.__name__ == __name__:
                wanted += [c for c in cs.params.values() if isinstance(c, tuple)]
        todo = [c for c in dict.fromkeys(wanted + [key]) if c not in _REPORTS]
        jobs = [j for c in todo for j in jobs_of(c)]
        results = aot.run_jobs(jobs, workers=2)
        it = iter(results)
        for c in todo:
            _REPORTS[c] = [aot.AOTReport.from_dict(r) for _ in jobs_of(c) for r in next(it)]
    return _REPORTS[key]


def _jobs(case):
    spec, arch, mode, d = case
    modes = ("off", "none") if mode == "same" else (mode,)
    return [{"arch": arch, "sass": mode == "same", "entry": "attncc.runtime.block_scores:aot_case",
             "kwargs": {"spec": os.path.join(SPECS_DIR, spec + ".attn"), "mode": m, "arch": arch,
                        "head_dim": d, "options": {"tile_1d": spec == "natten2d"}}}
            for m in modes]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-sm{c[1]}-{c[2]}-d{c[3]}")
def test_block_score_kernel_compiles_clean(request, case):
    reps = _reports(request, case, _jobs)
    assert reps
    for r in reps:
        assert r.ok, f"{case}: {r.name}: {r.error}"
        assert r.spill_bytes == 0, f"{case}: {r.name} spills {r.spill_bytes} B at {r.registers} regs"
        assert 0 < r.shared <= aot.SHARED_LIMIT[r.arch]
        if r.arch >= 90:
            assert r.wgmma and not r.mma_sync, f"{case}: products not all wgmma"


@pytest.mark.parametrize("case", SAME, ids=lambda c: c[0])
def test_default_launch_unchanged_by_the_pass(request, case):
    off, none = _reports(request, case, _jobs)
    assert off.ok and none.ok, (off.error, none.error)
    assert off.name == none.name
    assert off.registers == none.registers
    assert off.sass_instructions == none.sass_instructions > 0
    assert [lp.instructions for lp in off.loops if lp.sass_loop] == \
        [lp.instructions for lp in none.loops if lp.sass_loop]
