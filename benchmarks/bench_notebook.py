"""How much of the machine the notebooks' cpu-profile training runs use, and what other ways of running them get.

A notebook of the workbook's ``cpu`` profile trains each variant with 2 seeds, one run after the other, in
fp32 on the notebook's threads: fashion-mnist 32x32x1, batch 32, EDM v-prediction. This times that training
step (forward, backward, AdamW) for the tiny models, measured as achieved GFLOP/s (FLOPs of a step counted
by ``torch.utils.flop_counter`` on the meta device, so the attention kernel counts too), in these ways:

* ``fp32``: today, one seed at a time;
* ``bf16``: the same under bf16 autocast (``train.precision=bf16``);
* ``fp32 vmap``: the profile's seeds trained as one model, their weights stacked with
  ``torch.func.stack_module_state`` and the step ``vmap``-ed over them (one AdamW over the stacked tensors,
  which is elementwise, so each seed gets exactly its own update);
* ``fp32 2 procs``: the seeds as two processes of one thread each, started together (wall time until both
  finish); only with ``--threads 2``.

Work per notebook-hour is images/s summed over the seeds; ``speedup`` is each way's over today's. Ways are
timed in alternating rounds (the median round counts) so that load from other processes hits all of them.

    OMP_NUM_THREADS=2 python benchmarks/bench_notebook.py            # the cpu profile's models, 2 threads
    python benchmarks/bench_notebook.py --models IU-ViT-tiny --rounds 5 --json
"""
from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.func import functional_call, grad, stack_module_state, vmap
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vitdiff.diffusion import DiffusionLoss, make_process  # noqa: E402
from vitdiff.models import create_model  # noqa: E402
from vitdiff.precision import autocast  # noqa: E402
from vitdiff.workbook import PROFILES  # noqa: E402

CPU = torch.device("cpu")
# The cpu profile's diffusion recipe and geometry (vitdiff.workbook.PROFILES["cpu"]: fashion-mnist at 16x16).
PROFILE = PROFILES["cpu"]
CHANNELS, SIZE, LR = 1, PROFILE.recipe.data.image_size, PROFILE.recipe.train.lr


def loss_fn() -> DiffusionLoss:
    return DiffusionLoss(make_process(PROFILE.process, **PROFILE.process_kwargs), prediction=PROFILE.prediction,
                         weighting=PROFILE.weighting)


def build(name: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(name, in_channels=CHANNELS, image_size=SIZE)


def fake_batch(seeds: int, device: torch.device = CPU) -> dict[str, torch.Tensor]:
    """A step's images, noise levels and noise for each seed: (seeds, batch, ...)."""
    shape = (seeds, PROFILE.batch_size, CHANNELS, SIZE, SIZE)
    sigma = loss_fn().process.sample_sigma(seeds * PROFILE.batch_size, device=device).view(seeds, -1)
    return {"x0": torch.randn(shape, device=device), "sigma": sigma, "noise": torch.randn(shape, device=device)}


def step_flops(name: str) -> float:
    """FLOPs of one forward + backward of one seed's batch, counted on the meta device."""
    model = build(name, 0).to("meta")
    batch = {k: v[0] for k, v in fake_batch(1, torch.device("meta")).items()}
    with FlopCounterMode(display=False) as counter:
        loss_fn().loss_at(model, **batch).mean().backward()
    return counter.get_total_flops()


class SeparateRuns:
    """Today's way: each seed its own model and AdamW, stepped one after the other."""

    def __init__(self, name: str, seeds: int, precision: str):
        self.models = [build(name, seed) for seed in range(seeds)]
        self.optimizers = [torch.optim.AdamW(m.parameters(), lr=LR) for m in self.models]
        self.loss, self.precision, self.batch = loss_fn(), precision, fake_batch(seeds)

    def step(self) -> None:
        for index, (model, optimizer) in enumerate(zip(self.models, self.optimizers)):
            with autocast(self.precision, CPU):
                loss = self.loss.loss_at(model, **{k: v[index] for k, v in self.batch.items()})
            loss.float().mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


class StackedSeeds:
    """All seeds as one vmap-ed model over stacked weights; one AdamW over the stacked tensors."""

    def __init__(self, name: str, seeds: int, precision: str):
        models = [build(name, seed) for seed in range(seeds)]
        params, self.buffers = stack_module_state(models)
        self.params = {k: v.detach().requires_grad_(False) for k, v in params.items()}
        self.optimizer = torch.optim.AdamW(list(self.params.values()), lr=LR)
        skeleton = copy.deepcopy(models[0]).to("meta")
        loss, self.batch = loss_fn(), fake_batch(seeds)

        def seed_loss(params, buffers, x0, sigma, noise):
            def model(x, t, cond):
                return functional_call(skeleton, (params, buffers), (x, t, cond))
            model.in_channels = skeleton.in_channels  # read by the loss to match output channels
            with autocast(precision, CPU):
                per_example = loss.loss_at(model, x0, sigma, noise)
            return per_example.float().mean()

        self.grads = vmap(grad(seed_loss), randomness="different")

    def step(self) -> None:
        # vmap maps positional arguments only
        grads = self.grads(self.params, self.buffers, self.batch["x0"], self.batch["sigma"], self.batch["noise"])
        for name, param in self.params.items():
            param.grad = grads[name]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


# No bf16 vmap: in torch 2.14 the backward of a vmap-ed autocast forward fails on CPU ("expected scalar type
# BFloat16 but found Float").
WAYS = {"fp32": (SeparateRuns, "fp32"), "bf16": (SeparateRuns, "bf16"), "fp32 vmap": (StackedSeeds, "fp32")}


def timed_steps(runner, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        runner.step()
    return time.perf_counter() - start


def _one_thread_worker(name: str, steps: int, warmup: int, barrier, results) -> None:
    torch.set_num_threads(1)
    runner = SeparateRuns(name, 1, "fp32")
    timed_steps(runner, warmup)
    barrier.wait()
    timed_steps(runner, steps)
    results.put(time.perf_counter())


def two_processes(name: str, steps: int, warmup: int) -> float:
    """Wall seconds for two one-thread processes, one seed each, to run ``steps`` steps from a common start."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(3), context.Queue()
    workers = [context.Process(target=_one_thread_worker, args=(name, steps, warmup, barrier, results))
               for _ in range(2)]
    for worker in workers:
        worker.start()
    barrier.wait()
    start = time.perf_counter()
    ends = [results.get() for _ in workers]
    for worker in workers:
        worker.join()
    return max(ends) - start


def measure(name: str, args) -> list[dict]:
    seeds = len(PROFILE.seeds)
    flops = step_flops(name)
    runners = {way: cls(name, seeds, precision) for way, (cls, precision) in WAYS.items() if way in args.ways}
    for runner in runners.values():
        timed_steps(runner, args.warmup)
    seconds: dict[str, list[float]] = {way: [] for way in args.ways}
    for _ in range(args.rounds):
        for way in args.ways:
            if way == "fp32 2 procs":
                seconds[way].append(two_processes(name, args.steps, args.warmup))
            else:
                seconds[way].append(timed_steps(runners[way], args.steps))
    today = statistics.median(seconds["fp32"])
    rows = []
    for way, values in seconds.items():
        median = statistics.median(values)
        images = seeds * PROFILE.batch_size * args.steps
        rows.append({"model": name, "way": way, "threads": torch.get_num_threads(), "seeds": seeds,
                     "img_s": images / median, "gflops_per_s": seeds * flops * args.steps / median / 1e9,
                     "speedup": today / median})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["IU-ViT-tiny", "ASCEND-H-tiny", "UNet-tiny"])
    parser.add_argument("--ways", nargs="+", choices=[*WAYS, "fp32 2 procs"], default=None,
                        help="default: all (2 procs only with 2 threads)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed rounds per way")
    parser.add_argument("--steps", type=int, default=5, help="steps per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per way first")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads of the notebook process")
    parser.add_argument("--json", action="store_true", help="print only the rows, as a JSON list")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.ways is None:
        args.ways = [*WAYS] + (["fp32 2 procs"] if args.threads == 2 else [])
    if "fp32" not in args.ways:
        parser.error("--ways must include fp32: the other ways are measured against it")
    rows = []
    for name in args.models:
        for row in measure(name, args):
            rows.append(row)
            if not args.json:
                print(f"{row['model']:<14} {row['way']:<13} {row['img_s']:8.1f} img/s (both seeds) "
                      f"{row['gflops_per_s']:7.1f} GFLOP/s  x{row['speedup']:.2f} today's work per hour", flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
