"""Ahead-of-time compile gate for the generated decode kernel: compiled for sm_80 and sm_90
with the runtime's own launch specialization (`attncc.runtime.decode_launch:decode_case`,
paged cache, head dim 128, bf16), it must compile and spill no registers. The whole library
is swept by `python3 bench/bench_decode.py --aot` (docs/BENCHMARKS.md, Decode).
Skipped only where the Triton wheel lacks its NVIDIA backend / ptxas."""
import os

import pytest

from attncc.runtime import aot

SPECS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "specs")
_MISSING = aot.ptxas_missing()


@pytest.mark.skipif(_MISSING is not None, reason=f"no AOT compile: {_MISSING}")
def test_decode_kernel_compiles_without_spills():
    jobs = [{"arch": arch, "sass": False, "entry": "attncc.runtime.decode_launch:decode_case",
             "kwargs": {"spec": os.path.join(SPECS, "streaming_sinks.attn"), "head_dim": 128,
                        "page_size": 256, "cache_len": 1024}}
            for arch in (80, 90)]
    for job, reports in zip(jobs, aot.run_jobs(jobs, workers=2)):
        assert len(reports) == 1
        rep = aot.AOTReport.from_dict(reports[0])
        assert rep.ok, rep.error
        assert rep.name.startswith("attncc_dec_streaming_sinks_")
        assert rep.spill_bytes == 0, f"sm_{job['arch']}: {rep.spill_bytes} bytes spilled\n{rep.ptxas_log}"
        assert rep.registers > 0
