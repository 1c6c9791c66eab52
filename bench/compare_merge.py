"""A LoRA stack change at SD1.5 size: this checkout's adapter stack vs the one of a git
revision, interleaved in one process on one UNet.

    .venv/bin/python -m bench.compare_merge [--against main] [--repeats 5]

Two rank-16 kohya LoRAs (fp16 files) on the 160 attention Linears of an SD1.5-size UNet
with seeded random weights (fp32, CPU). Each repeat, for each implementation (order
alternating): a fresh `AdapterStack` applies [lora0 0.8, lora1 0.5] (backups + merges),
then changes lora0 to 0.3 (the "weight change"), then restores; the UNet must be back to
its base weights bit for bit before the other one runs. The table also prints the largest
difference between the two implementations' merged weights. Asserts nothing about time.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

from bench.bench_lora import _Pipe, sd15_unet, write_loras
from bench.common import Stat, machine
from pipelines.architecture import Architecture
from pipelines.lora import stack as current_stack
from pipelines.lora.files import LoraFileCache

ROOT = Path(__file__).resolve().parent.parent


def module_at(revision: str, path: str, name: str, replace: dict[str, str]) -> types.ModuleType:
    """`path` as it is at `revision`, imported as module `name` (imports rewritten by
    `replace`)."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{revision}:{path}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for old, new in replace.items():
        source = source.replace(old, new)
    module = types.ModuleType(name)
    sys.modules[name] = module  # dataclasses look their module up
    exec(compile(source, f"{revision}:{path}", "exec"), module.__dict__)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", default="main", help="git revision to compare with")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    module_at(args.against, "pipelines/lora/maths.py", "reference_maths", {})
    reference = module_at(
        args.against,
        "pipelines/lora/stack.py",
        "reference_stack",
        {"from pipelines.lora.maths import": "from reference_maths import"},
    )
    implementations = {args.against: reference, "this checkout": current_stack}
    unet = sd15_unet().requires_grad_(False)
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    cache = LoraFileCache(8 << 30)
    times: dict[str, dict[str, list[float]]] = {
        name: {"apply": [], "change": []} for name in implementations
    }
    merged: dict[str, dict[str, torch.Tensor]] = {}
    with tempfile.TemporaryDirectory() as folder:
        paths, _ = write_loras(unet, 2, 16, Path(folder))

        def stack(first: float) -> list[tuple[Path, str, float, float]]:
            return [(paths[0], "lora0", first, first), (paths[1], "lora1", 0.5, 0.5)]

        for index in range(args.repeats):
            names = list(implementations)
            for name in names if index % 2 == 0 else names[::-1]:
                applier = implementations[name].AdapterStack(_Pipe(unet), Architecture.SD1, cache)
                for label, weight in (("apply", 0.8), ("change", 0.3)):
                    started = time.perf_counter()
                    applier.apply_paths(stack(weight))
                    times[name][label].append(time.perf_counter() - started)
                merged.setdefault(
                    name, {k: v.clone() for k, v in unet.state_dict().items() if "attentions" in k}
                )
                applier.restore()
                now = unet.state_dict()
                assert all(torch.equal(base[k], now[k]) for k in base), f"{name}: not restored"
    first, second = merged.values()
    difference = max((first[k] - second[k]).abs().max().item() for k in first)
    print(f"Machine: {machine()}")
    print(
        f"# SD1.5-size UNet (fp32, CPU), two rank-16 LoRAs on 160 attention Linears; median "
        f"of {args.repeats} interleaved repeats ± spread; largest difference between the "
        f"merged weights: {difference:.2e}"
    )
    print("| adapter stack | apply [0.8, 0.5] s (backups + merges) | change to [0.3, 0.5] s |")
    print("|---|---:|---:|")
    for name, cells in times.items():
        apply, change = Stat(tuple(cells["apply"])), Stat(tuple(cells["change"]))
        print(f"| {name} | {apply.cell()} | {change.cell()} |")


if __name__ == "__main__":
    main()
