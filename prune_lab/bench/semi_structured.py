"""2:4 sparsity through PyTorch's semi-structured sparse kernels: does the pattern
prune_lab's N:M methods produce run faster than dense?

Each case is a linear layer as a GEMM (tokens × in → out), weights pruned to 2:4 by magnitude
with prune_lab's own `NMPattern` (the mask the methods export), then timed dense
(`F.linear(x, W)`) against `F.linear(x, to_sparse_semi_structured(W))` in interleaved rounds,
medians, with the outputs compared. The kernels (CUTLASS / cuSPARSELt) exist only for CUDA GPUs
with sparse tensor cores (compute capability >= 8.0) and half precision; on CPU nothing is timed
and the record says so: a 2:4 model on CPU runs dense kernels and is not faster.
"""
from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from prune_lab.sparsity.nm import NMPattern

# (name, tokens, in, out): a ResNet-50 1x1 convolution of stage 3 and 4 at batch 64 as GEMMs, and a
# transformer MLP projection (4,096 tokens)
CASES = (("resnet50 layer3 1x1 (1024->256), batch 64 at 14x14", 64 * 14 * 14, 1024, 256),
         ("resnet50 layer4 1x1 (2048->512), batch 64 at 7x7", 64 * 7 * 7, 2048, 512),
         ("MLP 4096->4096, 4096 tokens", 4096, 4096, 4096))
NO_KERNEL = ("PyTorch's semi-structured (2:4) sparse kernels run on CUDA GPUs with sparse tensor cores only; "
             "on CPU a 2:4 model runs dense kernels and executes the dense MACs: no speed-up")


def _median_ms(fn, sync, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        sync()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def semi_structured_speedup(device: str, dtype: torch.dtype = torch.float16, repeats: int = 50,
                            rounds: int = 5, cases=CASES) -> dict:
    """{"supported": bool, "reason"?, "cases": [{name, dense_ms, sparse_ms, speedup, max_abs_diff, pattern_holds}]}."""
    if device != "cuda" or not torch.cuda.is_available():
        return {"supported": False, "reason": NO_KERNEL}
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return {"supported": False, "reason": f"compute capability {major}.{minor} < 8.0: no sparse tensor cores"}
    from torch.sparse import to_sparse_semi_structured

    pattern, sync, out = NMPattern.parse("2:4"), torch.cuda.synchronize, []
    gen = torch.Generator(device="cpu").manual_seed(0)
    for name, tokens, n_in, n_out in cases:
        w = torch.randn(n_out, n_in, generator=gen)
        w = (w * pattern.mask(w.abs())).to("cuda", dtype)
        x = torch.randn(tokens, n_in, generator=gen).to("cuda", dtype)
        try:
            ws = to_sparse_semi_structured(w)
        except Exception as e:  # an unsupported build or shape: say so, time nothing
            return {"supported": False, "reason": f"to_sparse_semi_structured failed: {str(e).splitlines()[0]}"}
        with torch.no_grad():
            ref, got = F.linear(x, w), F.linear(x, ws)
            for _ in range(10):  # warm-up (kernel selection)
                F.linear(x, w), F.linear(x, ws)
            sync()
            dense, sparse = [], []
            for _ in range(rounds):  # interleaved: drift of the clock cancels
                dense.append(_median_ms(lambda: F.linear(x, w), sync, repeats))
                sparse.append(_median_ms(lambda: F.linear(x, ws), sync, repeats))
        d, s = statistics.median(dense), statistics.median(sparse)
        out.append({"name": name, "tokens": tokens, "in": n_in, "out": n_out, "dtype": str(dtype),
                    "dense_ms": d, "sparse_ms": s, "speedup": d / s,
                    "max_abs_diff": float((ref - got).abs().max()), "ref_max_abs": float(ref.abs().max()),
                    "pattern_holds": bool(pattern.holds(w.float().cpu()))})
    return {"supported": True, "gpu": torch.cuda.get_device_name(), "capability": f"{major}.{minor}", "cases": out}
