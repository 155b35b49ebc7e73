"""How much faster is a training step of the LSH output layer than a full softmax, at what label recall?

Every LSH layer runs on its defaults (``LSHConfig`` sizes the bits, the sample and the bucket read
cap to the catalogue); only the compared options (learned hashing, rebuild schedule) are set.
One process. Synthetic clustered data (class weights around cluster centres, queries near their
label's weight), hidden 128, batch 256. A step is forward + backward + Adagrad update; the LSH
layer's rebuilds (and projection training when learned) happen inside the timed steps, so their
cost is amortised. Printed as ratios ours / baseline (the full softmax), medians of repeats, with
the label recall in the sample and the rebuild counts of each schedule.

Example::

    python -m bench.lsh_output                       # 100K and 670K classes
    python -m bench.lsh_output --classes 100000 --repeats 2
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from pipelines.report import format_table
from recsys.lsh_output import FullSoftmaxOutput, LSHConfig, LSHOutputLayer

HIDDEN, BATCH = 128, 256


class ClusteredTask:
    """Class weights ``normalize(centre + spread * noise)``; a query is its label's weight plus noise."""

    def __init__(self, num_classes: int, clusters: int, query_noise: float, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        centres = F.normalize(torch.randn(clusters, HIDDEN, generator=g), dim=1)
        assign = torch.randint(0, clusters, (num_classes,), generator=g)
        self.weight = F.normalize(centres[assign] + 0.6 * torch.randn(num_classes, HIDDEN, generator=g) / 11.3, dim=1)
        self.num_classes, self.query_noise, self.g = num_classes, query_noise, g

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, self.num_classes, (BATCH,), generator=self.g)
        noise = torch.randn(BATCH, HIDDEN, generator=self.g) * self.query_noise / HIDDEN**0.5
        return 3.0 * F.normalize(self.weight[labels] + noise, dim=1), labels


def _step(layer, opt, hidden, labels) -> None:
    loss = layer(hidden, labels)
    opt.zero_grad()
    loss.backward()
    opt.step()


def time_layer(layer, task: ClusteredTask, warmup: int, steps: int, repeats: int) -> list[float]:
    """Mean step seconds of each repeat of ``steps`` steps, after ``warmup`` untimed steps."""
    opt = torch.optim.Adagrad([layer.weight], lr=0.01)
    batches = [task.batch() for _ in range(steps)]
    for i in range(warmup):
        _step(layer, opt, *batches[i % steps])
    if hasattr(layer, "reset_stats"):
        layer.reset_stats()
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        for hidden, labels in batches:
            _step(layer, opt, hidden, labels)
        times.append((time.perf_counter() - tick) / steps)
    return times


def lsh_config(learned: bool, schedule: str) -> LSHConfig:
    """The defaults (bits, sample size and bucket read cap sized to the catalogue), only the compared options set."""
    return LSHConfig(learned=learned, schedule=schedule, rebuild_mode="full" if schedule == "fixed" else "changed")


def run(classes: list[int], repeats: int, steps: int, warmup: int) -> None:
    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; hidden {HIDDEN}, batch {BATCH}; step = forward + backward + Adagrad update; "
          f"medians of {repeats} repeats of {steps} steps (rebuilds amortised inside)")  # fmt: skip
    for num_classes in classes:
        task = ClusteredTask(num_classes, clusters=max(num_classes // 500, 10), query_noise=0.3)
        full = FullSoftmaxOutput(HIDDEN, num_classes)
        full.weight.data.copy_(task.weight)
        full_time = statistics.median(time_layer(full, task, 1, 2, repeats))
        rows: list[list[object]] = [["full softmax", "-", "-", full_time, 1.0, 1.0, "-", "-", "-", "-"]]
        for learned in (False, True):
            for schedule in ("mongoose", "fixed", "every_step"):
                layer = LSHOutputLayer(HIDDEN, num_classes, lsh_config(learned, schedule))
                layer.weight.data.copy_(task.weight)
                layer.rebuild()
                seconds = statistics.median(time_layer(layer, task, warmup, steps, repeats))
                s = layer.stats()
                rows.append([
                    f"LSH L={layer.config.num_tables} K={layer.config.num_bits} S={layer.config.sample_size} "
                    f"cap={layer.config.max_per_bucket}",
                    "learned" if learned else "random",
                    schedule + (" (full)" if layer.config.rebuild_mode == "full" else " (rows)"),
                    seconds,
                    seconds / full_time,
                    full_time / seconds,
                    s["label_recall_in_sample"],
                    s["label_recall_own_bucket"],
                    f"{s['rebuilds']}/{s['steps']}",
                    f"{s['hash_trainings']}/{s['hash_updates']}" if learned else "-",
                ])  # fmt: skip
        print(f"\n{num_classes:,} classes")
        header = ["layer", "hash", "schedule", "step s", "ours/full", "speed-up", "recall in sample",
                  "recall own bucket", "rebuilds/steps", "hash trained/adopted"]  # fmt: skip
        print(format_table(header, rows))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.lsh_output", description=__doc__.split("\n")[0])
    p.add_argument("--classes", type=lambda s: [int(v) for v in s.split(",")], default=[100_000, 670_000],
                   help="comma-separated class counts")  # fmt: skip
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per configuration")
    p.add_argument("--steps", type=int, default=30, help="steps per repeat")
    p.add_argument("--warmup", type=int, default=40, help="untimed steps first (learned hashing collects pairs)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    run(args.classes, args.repeats, args.steps, args.warmup)


if __name__ == "__main__":
    main()
