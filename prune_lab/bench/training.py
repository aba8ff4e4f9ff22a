"""What prune_lab costs while training: masked vs dense steps, structural mask updates, peak
memory, and the search methods' fitness evaluations (scripts/bench.py reports them)."""
from __future__ import annotations

import contextlib
import copy
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from prune_lab.models import classifier_of, create_model
from prune_lab.sparsity import CosineDecay, Cubic, DropGrow, MaskSet, count_flops, masks_from_scores, prunable_weights


def timed(fn, sync) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def autocast(device: str, amp: str | None):
    return torch.autocast(device, dtype=torch.bfloat16) if amp == "bf16" else contextlib.nullcontext()


def sparse_masks(model, sparsity: float) -> MaskSet:
    masks = MaskSet(model)
    scores = {n: p.detach().abs() for n, p in prunable_weights(model).items()}
    for n, keep in masks_from_scores(scores, sparsity, "erk").items():
        masks.set(n, keep)
    masks.apply()
    return masks


def sgd_step(model, x, y, amp=None, masks: MaskSet | None = None, compile_: bool = False):
    """One training step of `model` on (x, y) as a closure; with `masks`, enforced as MaskUpdate
    does (on the gradients before the step, on the weights after it)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    # torch.compile wraps the forward only: masks act on the parameters outside the graph
    forward = torch.compile(model) if compile_ else model

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast(x.device.type, amp):
            loss = F.cross_entropy(forward(x), y)
        loss.backward()
        if masks is not None:
            masks.mask_grads()
        opt.step()
        if masks is not None:
            masks.apply()
    return step


def interleaved_steps(steps_by_name: dict, steps: int, rounds: int, sync, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per step of each closure in each round of `steps` steps; within a round the
    closures take turns (alternating which goes first, so none inherits another's cache state),
    so a ratio of two closures' times in the same round cancels the machine's drift."""
    for _ in range(warmup):
        for fn in steps_by_name.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in steps_by_name}
    names = list(steps_by_name)
    for r in range(rounds):
        for k in (names if r % 2 == 0 else names[::-1]):
            times[k].append(timed(lambda: [steps_by_name[k]() for _ in range(steps)], sync) / steps)
    return times


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of a/b: each round's two timings were taken back to back."""
    return statistics.median(x / y for x, y in zip(a, b))


def train_overhead(name: str, model, x, y, steps: int, rounds: int, sync, amp=None, compile_=False) -> dict:
    """Masked training step (masks on gradients and weights every step) vs the dense step."""
    dense, masked = model, copy.deepcopy(model)
    masks = sparse_masks(masked, 0.9)
    t = interleaved_steps({"dense": sgd_step(dense, x, y, amp, None, compile_),
                           "masked": sgd_step(masked, x, y, amp, masks, compile_)},
                          steps, rounds, sync, warmup=3 if compile_ else 1)  # compilation in the warm-up
    d, m = statistics.median(t["dense"]), statistics.median(t["masked"])
    # the enforcement alone, timed directly: end-to-end step ratios carry a few % of noise on CPU
    ops = statistics.median(timed(lambda: (masks.mask_grads(), masks.apply()), sync) for _ in range(50))
    return {"model": name, "batch": len(x), "amp": amp, "compile": compile_, "dense_step_ms": 1e3 * d,
            "masked_step_ms": 1e3 * m, "ratio": paired_ratio(t["masked"], t["dense"]), "mask_ops_ms": 1e3 * ops,
            "mask_ops_fraction_of_step": ops / d}


def channels_last_gain(name: str, model, x, y, steps: int, rounds: int, sync, amp=None) -> dict:
    """Masked training in the default layout vs in channels-last (`module.channels_last=true`):
    the speed-up of the step, masks enforced in both."""
    nchw = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    nhwc = copy.deepcopy(model).to(memory_format=torch.channels_last)
    t = interleaved_steps({"nchw": sgd_step(nchw, x, y, amp, sparse_masks(nchw, 0.9)),
                           "channels_last": sgd_step(nhwc, x.contiguous(memory_format=torch.channels_last), y, amp,
                                                     sparse_masks(nhwc, 0.9))}, steps, rounds, sync)
    return {"model": name, "batch": len(x), "amp": amp, "nchw_step_ms": 1e3 * statistics.median(t["nchw"]),
            "channels_last_step_ms": 1e3 * statistics.median(t["channels_last"]),
            "speedup": paired_ratio(t["nchw"], t["channels_last"])}


def compile_gain(name: str, model, x, y, steps: int, rounds: int, sync, amp=None) -> dict:
    """Masked training eager vs through torch.compile (`module.compile=true`: the forward and its
    backward compiled, masks enforced outside the graph as MaskUpdate does): compiled/eager step
    time, and the seconds the first compiled step took (compilation)."""
    eager, compiled = copy.deepcopy(model), copy.deepcopy(model)
    steps_by_name = {"eager": sgd_step(eager, x, y, amp, sparse_masks(eager, 0.9)),
                     "compiled": sgd_step(compiled, x, y, amp, sparse_masks(compiled, 0.9), compile_=True)}
    first = timed(steps_by_name["compiled"], sync)
    t = interleaved_steps(steps_by_name, steps, rounds, sync, warmup=2)
    return {"model": name, "batch": len(x), "amp": amp, "eager_step_ms": 1e3 * statistics.median(t["eager"]),
            "compiled_step_ms": 1e3 * statistics.median(t["compiled"]), "first_compiled_step_s": first,
            "compiled_over_eager": paired_ratio(t["compiled"], t["eager"])}


class StepDriver:
    """A bare training loop over one synthetic batch that drives a method's real update code and
    times it: `hook_s[step]` is the time spent in the method's hooks at that optimizer step, and
    `changed_steps` the steps at which the masks changed (so no benchmark times a no-op)."""

    def __init__(self, model, x, y, sync, start_sparsity: float | None = 0.9):
        self.model, self.x, self.y, self.sync = model, x, y, sync
        # sparse methods start from a random-like 90 % ERK mask; gradual pruning starts dense
        self.masks = MaskSet(model) if start_sparsity is None else sparse_masks(model, start_sparsity)
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        self.hook_s: dict[int, float] = {}
        self.changed_steps: list[int] = []
        self.module = SimpleNamespace(model=model, masks=self.masks)  # what MaskUpdate.update reads

    def hook(self, step, fn, *args):
        self.sync()
        t0 = time.perf_counter()
        out = fn(*args)
        self.sync()
        self.hook_s[step] = self.hook_s.get(step, 0.0) + time.perf_counter() - t0
        return out

    def step_ms(self, repeats: int = 5) -> float:
        def plain():
            self.opt.zero_grad(set_to_none=True)
            F.cross_entropy(self.model(self.x), self.y).backward()
            self.opt.step()
        plain()
        return 1e3 * statistics.median(timed(plain, self.sync) for _ in range(repeats))

    def run(self, steps: int, total: int, policy=None, gmp=None):
        if policy is not None:
            policy.bind(self.model, self.masks, self.x[:1], classifier_of(self.model)[1])
        opts = [self.opt]
        snapshot = self._snapshot()
        for step in range(steps):
            if gmp is not None and gmp.schedule.is_update(step, total):
                self.hook(step, lambda: (gmp.update(self.module, (self.x, self.y), 0.9 * gmp.schedule.fraction(step, total)),
                                         self.masks.mask_optimizer_state(self.opt)))
            if policy is not None:
                self.hook(step, policy.before_forward, step, total, opts)
            self.opt.zero_grad(set_to_none=True)
            F.cross_entropy(self.model(self.x), self.y).backward()
            if policy is not None:
                self.hook(step, policy.after_backward, step, total, opts)
                self.hook(step, policy.before_optimizer_step, step, self.opt)
            self.masks.mask_grads()
            self.opt.step()
            self.masks.apply()
            if policy is not None:
                self.hook(step, policy.after_optimizer_step, step, self.opt)
            now = self._snapshot()
            if any(not torch.equal(now[n], snapshot[n]) for n in now):
                self.changed_steps.append(step)
            snapshot = now

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {n: self.masks[n].clone() for n in self.masks.prunable}


def update_cost(x, y, sync) -> dict:
    """Each dynamic method's structural updates (its real update code, driven step by step on
    ResNet-20), as a fraction of training time at the method's default update period:

        GMP   one cubic-schedule update (magnitude scores + masks + optimizer state) every 20 steps
        RigL  one drop-and-grow (|w| drop, |∂L/∂w| grow, optimizer-state reset) every 100 steps
        IEE   per 450-step cycle: prune, start of exploration and grow, plus its per-step work in
              the 150 exploration steps (active weights and optimizer state restored after each)

    Update hooks are timed over a short run (IEE with 3-step phases) and amortised with the
    default periods; the training step is timed alone on the same model and batch."""
    # imported here: the peak-memory child processes import this module and should stay light
    from prune_lab.callbacks import MaskUpdate
    from prune_lab.methods.iee import IEE

    def fresh(start_sparsity=0.9):
        return StepDriver(create_model("resnet20", num_classes=10).to(x.device), x, y, sync, start_sparsity)

    out = {}
    t = fresh(start_sparsity=None)
    step_ms = t.step_ms()
    gmp = MaskUpdate(budget=0.9, importance="magnitude", distribution="uniform", schedule=Cubic(end=1.0, every=1))
    t.run(6, total=40, gmp=gmp)
    upd = 1e3 * statistics.median([t.hook_s[s] for s in range(2, 6)])  # step 0 prunes nothing; 1 builds caches
    out["gmp"] = {"update_ms": upd, "period_steps": 20, "fraction": upd / (upd + 20 * step_ms),
                  "changed_steps": t.changed_steps}

    t = fresh()
    rigl = DropGrow(grow="gradient", schedule=CosineDecay(init=0.3, every=2, end=1.0))
    t.run(8, total=10, policy=rigl)
    upd = 1e3 * statistics.median(t.hook_s[s] for s in range(2, 8, 2))
    out["rigl"] = {"update_ms": upd, "period_steps": 100, "fraction": upd / (upd + 100 * step_ms),
                   "changed_steps": t.changed_steps}

    t = fresh()
    h = j = q = 3
    iee = IEE(estimate_steps=h, improve_steps=j, explore_steps=q, stop=1.0)
    t.run(3 * (h + j + q) + 1, total=3 * (h + j + q) + 2, policy=iee)
    cyc = h + j + q
    per_kind: dict[str, list[float]] = {}
    for step, s in t.hook_s.items():
        r = step % cyc
        kind = "grow" if r == 0 and step > 0 else "prune" if r == h else "start_explore" if r == h + j else \
            iee.phase(step, iee.total_steps)
        per_kind.setdefault(kind, []).append(1e3 * s)
    med = {k: statistics.median(v) for k, v in per_kind.items()}
    default = {"estimate": 150, "improve": 150, "explore": 150}
    # transition steps carry their phase's per-step work too; counted once, as the transition
    cycle_ms = med["grow"] + med["prune"] + med["start_explore"] + sum(
        n * med.get(k, 0.0) for k, n in default.items()) - med.get("estimate", 0) - med.get("improve", 0) - \
        med.get("explore", 0)
    out["iee"] = {"hook_ms_by_kind": med, "period_steps": 450, "cycle_hooks_ms": cycle_ms,
                  "fraction": cycle_ms / (cycle_ms + 450 * step_ms), "changed_steps": t.changed_steps}
    out["step_ms"] = step_ms
    out["worst"] = max(("gmp", "rigl", "iee"), key=lambda k: out[k]["fraction"])
    return out


def _resident_kb() -> int:
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])


def _model_and_batch(name: str, batch: int, device: str):
    if name == "resnet50":
        import torchvision
        m, size, classes = torchvision.models.resnet50(num_classes=1000), 224, 1000
    else:
        m, size, classes = create_model(name, num_classes=10), 32, 10
    x, y = torch.randn(batch, 3, size, size, device=device), torch.randint(0, classes, (batch,), device=device)
    return m.to(device), x, y


def peak_training_memory(name: str, batch: int, masked: bool, device: str) -> tuple[int, int]:
    """(baseline, peak) in KiB of three training steps of model `name` (resnet20 on 32², resnet50
    on 224²): the baseline once the model and the batch exist, the peak at the end. CPU: the
    process's peak resident set (so run it in a fresh process); GPU: torch.cuda's statistics."""
    torch.manual_seed(0)
    cuda = device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    m, x, y = _model_and_batch(name, batch, device)
    base = torch.cuda.memory_allocated() // 1024 if cuda else _resident_kb()
    masks = sparse_masks(m, 0.9) if masked else None
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        if masks:
            masks.mask_grads()
        opt.step()
        if masks:
            masks.apply()
    if cuda:
        torch.cuda.synchronize()
    return base, (torch.cuda.max_memory_allocated() // 1024 if cuda else _resident_kb())


def peak_memory(name: str, batch: int, device: str, repeats: int = 3) -> dict:
    """Peak memory of training `name` masked (90 % ERK) vs dense, counted above what the model and batch
    take before training (the import of torch alone is ~0.8 GB of resident memory and would
    dilute the ratio). On CPU each run is a fresh process (the peak resident set never falls) in
    which glibc serves every allocation of 64 KiB or more by mmap and returns it when freed:
    with its default heap, fragmentation moves the peak by ±10 MB from process to process.
    Medians over `repeats`."""
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    runs: dict[str, list[int]] = {"dense": [], "masked": []}
    for _ in range(repeats if device == "cpu" else 1):
        for masked in (False, True):
            if device == "cuda":
                base, peak = peak_training_memory(name, batch, masked, device)
            else:
                code = (f"from prune_lab.bench.training import peak_training_memory as f; "
                        f"print(*f({name!r}, {batch}, {masked}, 'cpu'))")
                stdout = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                        cwd=root, env=env).stdout
                base, peak = map(int, stdout.split()[-2:])
            runs["masked" if masked else "dense"].append(peak - base)
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {"model": name, "batch": batch, "training_kb": runs, "dense_kb": med["dense"], "masked_kb": med["masked"],
            "ratio": med["masked"] / med["dense"], "device": device}


def stp_search_cost(evals: int, device: str, sync) -> dict:
    """One STP fitness evaluation: the KD loss of a subnet (run inside the full model) on a batch."""
    from prune_lab.sparsity.calibration import frozen_bn_stats
    from prune_lab.sparsity.subnet import SubnetSpace
    import random

    model = create_model("resnet56", num_classes=10).train()
    x = torch.randn(256, 3, 32, 32)
    space = SubnetSpace(model, x[:1], ignored=[model.fc])
    model, x = model.to(device), x.to(device)
    rng = random.Random(0)
    archs = [space.random(rng) for _ in range(evals)]

    def evaluate():
        for a in archs:
            with space.activate(a):
                F.kl_div(F.log_softmax(model(x), 1), F.softmax(full, 1), reduction="batchmean").item()

    with torch.no_grad(), frozen_bn_stats(model):
        full = model(x)
        per_eval = timed(evaluate, sync) / evals
    return {"model": "resnet56", "images": len(x), "seconds_per_fitness_eval": per_eval}


def _fitness_before(model, names, batches):
    """The fitness as scored before candidates were batched (kept as the benchmark's baseline):
    one private copy, NCHW, an index write per layer, BN re-estimation, top-1 per calibration batch."""
    from prune_lab.sparsity import recalibrate_bn, top1_accuracy

    work = copy.deepcopy(model)
    params = dict(work.named_parameters())
    dense = {n: params[n].detach().clone() for n in names}
    order = {n: torch.sort(w.abs().flatten(), stable=True).indices for n, w in dense.items()}

    @torch.no_grad()
    def fitness(pruned):
        for n in names:
            params[n].copy_(dense[n])
            params[n].view(-1)[order[n][:int(pruned[n])]] = 0
        recalibrate_bn(work, batches, 1e-6, None, 0)
        return top1_accuracy(work, batches)
    return fitness


def unipts_search_cost(evals: int, device: str, sync, rounds: int = 3, stack: int | None = None) -> dict:
    """One UniPTS fitness evaluation (prune to an allocation, re-estimate BN, calibration top-1) on
    the evidence benchmark's model (ResNet-14, 1x16x16 images, 2,048 calibration images in batches
    of 128): the scoring before this change vs now (`AllocationFitness`, one candidate per pass,
    channels-last, eval pass in batches of 1,024) vs now with `stack` candidates per pass.
    Interleaved rounds, medians; `fitness_identical` says whether all three gave the same values;
    `max_exact_speedup_at_gemm_rate` bounds what any exact scoring could gain (MACs at GEMM speed)."""
    from prune_lab.callbacks.search import AllocationFitness
    from prune_lab.methods.unipts import decode_genome

    torch.manual_seed(0)
    model = create_model("resnet14", num_classes=10, in_channels=1).to(device)
    with torch.no_grad():  # BN statistics of a trained-looking model, not the initial 0/1
        model.train()(torch.randn(256, 1, 16, 16, device=device))
    model.eval()
    batches = [(torch.randn(128, 1, 16, 16, device=device), torch.randint(0, 10, (128,), device=device))
               for _ in range(16)]
    weights = prunable_weights(model)
    numel = {n: p.numel() for n, p in weights.items()}
    stack = stack or evals
    allocations = [decode_genome(torch.randn(len(numel), generator=torch.Generator().manual_seed(i), dtype=torch.float64),
                                 numel, 0.9) for i in range(evals)]
    before = _fitness_before(model, list(numel), batches)
    now = AllocationFitness(model, list(numel), batches, stack=1, eval_batch_size=1024)
    stacked = AllocationFitness(model, list(numel), batches, stack=stack, eval_batch_size=1024)
    paths = {"before": lambda: [before(a) for a in allocations], "now": lambda: now.many(allocations),
             "stacked": lambda: stacked.many(allocations)}
    values = {k: f() for k, f in paths.items()}  # also the warm-up
    times: dict[str, list[float]] = {k: [] for k in paths}
    for r in range(rounds):
        for k in (list(paths) if r % 2 == 0 else list(paths)[::-1]):
            times[k].append(timed(paths[k], sync) / evals)
    med = {k: statistics.median(v) for k, v in times.items()}
    # The ceiling on any exact speed-up: an evaluation is two forward passes over the 2,048 images
    # (BN re-estimation, then scoring), whose multiply-accumulates a masked candidate still does;
    # a large fp32 matrix product on the same thread(s) is the rate this core reaches at best.
    macs = 2 * 2048 * count_flops(model, torch.zeros(1, 1, 16, 16, device=device))
    a = torch.randn(1024, 1024, device=device)
    gemm = statistics.median(timed(lambda: a @ a, sync) for _ in range(2 * rounds + 1))
    rate, peak = macs / med["now"] / 1e9, 1024 ** 3 / gemm / 1e9
    return {"model": "resnet14", "input": [1, 16, 16], "images": 2048, "batch": 128, "evaluations": evals,
            "macs_per_fitness_eval": macs, "gmacs_per_s": rate, "gemm_gmacs_per_s": peak,
            "max_exact_speedup_at_gemm_rate": peak / rate,
            "stack": stack, "threads": torch.get_num_threads(),
            "seconds_per_fitness_eval": med["now"], "seconds_per_fitness_eval_before": med["before"],
            "seconds_per_fitness_eval_stacked": med["stacked"],
            "speedup": paired_ratio(times["before"], times["now"]),
            "speedup_stacked": paired_ratio(times["before"], times["stacked"]),
            "fitness_identical": values["before"] == values["now"] == values["stacked"]}
