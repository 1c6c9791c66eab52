"""LoRA stacking benchmark: per-step cost of merged vs unmerged LoRAs, restack and load times.

Prints a table; asserts nothing about time. Run from the repo root:

    .venv/bin/python -m bench.bench_lora            # SD1.5-size UNet, random weights, 256x256
    .venv/bin/python -m bench.bench_lora --quick     # tiny UNet: proves the script runs (CI)

"Unmerged" is the per-forward mode (A1111's old one, and what peft adapters do): every
LoRA adds x @ down.T @ up.T * scale to its layer's output on every step. "Merged" is
pipelines.lora: the deltas are in the weights, so a step costs what the base model costs.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from bench.common import Stat, machine, make_cold
from pipelines.architecture import Architecture
from pipelines.lora.files import LoraFileCache
from pipelines.lora.stack import AdapterStack, StackEntry
from pipelines.lora.weights import WeightSchedule


def sd15_unet() -> torch.nn.Module:
    """An SD1.5-shaped UNet (860M parameters) with seeded random weights."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=64,
        cross_attention_dim=768,
        attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
    ).eval()


def tiny_unet() -> torch.nn.Module:
    from pipelines.loading import CONFIGS_DIR, random_pipeline

    with tempfile.TemporaryDirectory() as cache:
        return random_pipeline(CONFIGS_DIR / "demo-tiny.yaml", 0, Path(cache)).pipe.unet.eval()


class _Pipe:
    """Just enough of a pipeline for AdapterStack: the UNet alone."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.unet = unet


def lora_targets(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """The layers kohya's default LoRA trains: every Linear inside the transformer blocks."""
    return [
        (name, m)
        for name, m in unet.named_modules()
        if isinstance(m, torch.nn.Linear) and "attentions" in name
    ]


def write_loras(
    unet: torch.nn.Module, count: int, rank: int, folder: Path
) -> tuple[list[Path], list[dict[str, torch.Tensor]]]:
    """`count` kohya rank-`rank` fp16 LoRA files over every attention-block Linear."""
    paths, states = [], []
    for index in range(count):
        gen = torch.Generator().manual_seed(index)
        state: dict[str, torch.Tensor] = {}
        for name, layer in lora_targets(unet):
            key = "lora_unet_" + name.replace(".", "_")
            state[f"{key}.lora_down.weight"] = (
                torch.randn(rank, layer.in_features, generator=gen) * 0.01
            ).half()
            state[f"{key}.lora_up.weight"] = (
                torch.randn(layer.out_features, rank, generator=gen) * 0.01
            ).half()
            state[f"{key}.alpha"] = torch.tensor(float(rank // 2))
        path = folder / f"lora{index}.safetensors"
        save_file(state, str(path))
        paths.append(path)
        states.append(state)
    return paths, states


TYPES = ("lora", "loha", "lokr", "ia3", "full", "norm", "glora", "oft", "boft")


def typed_state(unet: torch.nn.Module, kind: str, rank: int) -> dict[str, torch.Tensor]:
    """One LyCORIS-keyed file of network type `kind` over the attention-block layers
    (`norm`: their LayerNorm/GroupNorm layers), with seeded random tensors."""
    gen = torch.Generator().manual_seed(TYPES.index(kind))

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.01

    state: dict[str, torch.Tensor] = {}
    if kind == "norm":
        for name, layer in unet.named_modules():
            if isinstance(layer, torch.nn.LayerNorm | torch.nn.GroupNorm) and "attentions" in name:
                key = "lycoris_" + name.replace(".", "_")
                state[f"{key}.w_norm"] = rand(*layer.weight.shape)
                state[f"{key}.b_norm"] = rand(*layer.bias.shape)
        return state
    for name, layer in lora_targets(unet):
        key = "lycoris_" + name.replace(".", "_")
        out, inp = layer.out_features, layer.in_features
        parts: dict[str, torch.Tensor] = {"alpha": torch.tensor(float(rank // 2))}
        if kind == "lora":
            parts.update({"lora_down.weight": rand(rank, inp), "lora_up.weight": rand(out, rank)})
        elif kind == "loha":
            for w in ("w1", "w2"):
                parts.update({f"hada_{w}_a": rand(out, rank), f"hada_{w}_b": rand(rank, inp)})
        elif kind == "lokr":
            parts = {"lokr_w1": rand(4, 4), "lokr_w2": rand(out // 4, inp // 4)}
        elif kind == "ia3":
            parts = {"weight": rand(out), "on_input": torch.tensor(0)}
        elif kind == "full":
            parts = {"diff": rand(out, inp)}
            if layer.bias is not None:
                parts["diff_b"] = rand(out)
        elif kind == "glora":
            parts.update(
                {
                    "a1.weight": rand(inp, rank),
                    "a2.weight": rand(rank, inp),
                    "b1.weight": rand(out, rank),
                    "b2.weight": rand(rank, inp),
                }
            )
        elif kind == "oft":
            parts = {"oft_blocks": rand(out // 8, 8, 8), "alpha": torch.tensor(0.0)}
        else:  # boft: two butterfly stages of 4x4 blocks
            parts = {"oft_blocks": rand(2, out // 4, 4, 4), "alpha": torch.tensor(0.0)}
        state.update({f"{key}.{part}": tensor for part, tensor in parts.items()})
    return state


def add_hooks(unet: torch.nn.Module, states: list[dict[str, torch.Tensor]]) -> list:
    """Unmerged mode: each LoRA adds its low-rank product, scaled by the file's alpha over
    its rank (kohya's rule, as the merge uses), to the layer output per forward."""
    handles = []
    for name, layer in lora_targets(unet):
        key = "lora_unet_" + name.replace(".", "_")
        pairs = []
        for s in states:
            down = s[f"{key}.lora_down.weight"].float()
            scale = s[f"{key}.alpha"].item() / down.shape[0]
            pairs.append((down, s[f"{key}.lora_up.weight"].float() * scale))

        def hook(_module, inputs, output, pairs=pairs):
            for down, up in pairs:
                output = output + torch.nn.functional.linear(
                    torch.nn.functional.linear(inputs[0], down), up
                )
            return output

        handles.append(layer.register_forward_hook(hook))
    return handles


def seconds_per_step(unet: torch.nn.Module, latent: int, repeats: int) -> float:
    """Median seconds of one UNet call on a CFG batch of 2 at `latent` x `latent`."""
    channels = unet.config.in_channels
    context = unet.config.cross_attention_dim
    x = torch.randn(2, channels, latent, latent, generator=torch.Generator().manual_seed(0))
    text = torch.randn(2, 77, context, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500, 500])
    times = []
    with torch.inference_mode():
        unet(x, t, encoder_hidden_states=text)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            unet(x, t, encoder_hidden_states=text)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def timed(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def measure(quick: bool, repeats: int | None = None) -> dict:
    """Seconds per UNet step with 0..10 LoRAs merged vs unmerged, and stack operations."""
    unet = tiny_unet() if quick else sd15_unet()
    latent = 8 if quick else 32  # 256x256 pixels / VAE factor 8
    repeats = repeats or (2 if quick else 5)
    counts = [0, 1, 2, 5] if quick else [0, 1, 2, 5, 10]
    rank = 4 if quick else 16
    result: dict = {
        "model": "tiny UNet" if quick else "SD1.5-size UNet (random weights)",
        "latent": latent,
        "rank": rank,
        "threads": torch.get_num_threads(),
        "targets": len(lora_targets(unet)),
        "steps": [],
        "repeats": repeats,
        "machine": machine(),
    }
    with tempfile.TemporaryDirectory() as folder:
        paths, states = write_loras(unet, max(counts), rank, Path(folder))
        cache = LoraFileCache(8 << 30)
        applier = AdapterStack(_Pipe(unet), Architecture.SD1, cache)
        seconds_per_step(unet, latent, 1)  # warm-up
        for count in counts:
            # base, merged and unmerged steps interleaved, so drift hits all three alike
            times: dict[str, list[float]] = {"base": [], "merged": [], "unmerged": []}
            stack = [(p, p.stem, 1.0, 1.0) for p in paths[:count]]
            modes = list(times)
            for index in range(repeats):  # the order rotates: no mode always runs first
                for mode in modes[index % 3 :] + modes[: index % 3]:
                    if mode == "merged":
                        applier.apply_paths(stack)  # 0 LoRAs: measured too, nothing filled in
                        times[mode].append(seconds_per_step(unet, latent, 1))
                        applier.apply_paths([])
                    elif mode == "unmerged":
                        handles = add_hooks(unet, states[:count])
                        times[mode].append(seconds_per_step(unet, latent, 1))
                        for handle in handles:
                            handle.remove()
                    else:
                        times[mode].append(seconds_per_step(unet, latent, 1))
            row: dict = {"loras": count}
            for mode in ("base", "merged", "unmerged"):
                values = times[mode]
                row[mode] = statistics.median(values)
                row[f"{mode}_spread"] = max(values) - min(values)
            result["steps"].append(row)
        five = [(p, p.stem, 1.0, 1.0) for p in paths[:5]]
        changed = list(five)
        changed[2] = (five[2][0], five[2][1], 0.5, 0.5)
        operations: dict[str, list[float]] = {name: [] for name in OPERATIONS}
        for index in range(repeats):  # each operation from the state the one before left
            operations[OPERATIONS[0]].append(timed(lambda: applier.apply_paths(five)))
            operations[OPERATIONS[1]].append(timed(lambda: applier.apply_paths(changed)))
            operations[OPERATIONS[2]].append(timed(lambda: applier.apply_paths([])))
            # a fresh copy: no open mapping of the file keeps its pages in memory
            cold = Path(folder) / f"cold{index}.safetensors"
            shutil.copyfile(paths[0], cold)
            how = make_cold(cold)
            operations[OPERATIONS[3]].append(timed(lambda cold=cold: LoraFileCache().get(cold)))
            operations[OPERATIONS[4]].append(timed(lambda: cache.get(paths[0])))
        result["operations"] = {k: Stat(tuple(v)).as_dict() for k, v in operations.items()}
        result["cold_load"] = how
        result["types"] = []
        for kind in TYPES:
            path = Path(folder) / f"{kind}.safetensors"
            save_file(typed_state(unet, kind, rank), str(path))
            groups = len(cache.get(path).groups)
            one = [(path, kind, 0.8, 0.8)]
            merges, restores = [], []
            for _ in range(repeats):
                merges.append(timed(lambda one=one: applier.apply_paths(one)))
                restores.append(timed(lambda: applier.apply_paths([])))
            merge, restore = statistics.median(merges), statistics.median(restores)
            result["types"].append(
                {"type": kind, "modules": groups, "merge": merge, "restore": restore}
            )
        result["schedules"] = schedule_costs(applier, paths[0], unet, latent)
    return result


OPERATIONS = (
    "apply a 5-LoRA stack (files cached)",
    "change one weight in the 5-LoRA stack",
    "remove all 5 (restore from backup)",
    "load one LoRA file cold (not in the page cache)",
    "load the same file from the cache",
)

SCHEDULES = (
    ("constant (1@0,1@1)", WeightSchedule(((1.0, 0.0), (1.0, 1.0)))),
    ("ramp (0@0,1@1)", WeightSchedule(((0.0, 0.0), (1.0, 1.0)))),
    ("two-keyframe step (0@10,1@11)", WeightSchedule(((0.0, 10.0), (1.0, 11.0)))),
)
SCHEDULE_STEPS = 20


def schedule_costs(applier: AdapterStack, path: Path, unet: torch.nn.Module, latent: int) -> list:
    """What a per-step schedule adds to a 20-step run: the denoising loop's hook
    (`AdapterStack.reweight` with the step's weight) timed at every step, next to one UNet
    step. Only steps whose weight changes re-merge, each the LoRA's layers once."""
    step = seconds_per_step(unet, latent, 1)
    rows = []
    for label, schedule in SCHEDULES:
        applier.apply_paths(
            [StackEntry(path, "lora0", schedule.at(0, SCHEDULE_STEPS), 0.0, scheduled=True)]
        )
        times, merged = [], 0
        for index in range(SCHEDULE_STEPS):
            weight = schedule.at(index, SCHEDULE_STEPS)
            start = time.perf_counter()
            merged += applier.reweight({0: (weight, 0.0)})
            times.append(time.perf_counter() - start)
        rows.append(
            {
                "schedule": label,
                "layers_merged": merged,
                "per_step": sum(times) / SCHEDULE_STEPS,
                "worst_step": max(times),
                "unet_step": step,
            }
        )
        applier.apply_paths([])
    return rows


def print_tables(result: dict) -> None:
    print(f"Machine: {result['machine']}")
    print(
        f"# {result['model']}, latent {result['latent']}x{result['latent']} (batch 2), "
        f"rank-{result['rank']} LoRAs on {result['targets']} attention Linears, "
        f"{result['threads']} threads; median of {result['repeats']} interleaved repeats "
        "± spread (max - min)"
    )
    print("\n| LoRAs | base s/step | unmerged s/step | merged s/step | merged vs base |")
    print("|---:|---:|---:|---:|---:|")
    for row in result["steps"]:
        overhead = 100 * (row["merged"] / row["base"] - 1)
        cells = [f"{row[m]:.3f} ±{row[m + '_spread']:.3f}" for m in ("base", "unmerged", "merged")]
        print(f"| {row['loras']} | {' | '.join(cells)} | {overhead:+.1f}% |")
    print(f"\n| operation ({result['repeats']} repeats) | seconds |")
    print("|---|---:|")
    for name, stat in result["operations"].items():
        print(f"| {name} | {stat['median']:.4f} ±{stat['spread']:.4f} |")
    print(f"\nCold load: {result['cold_load']}")
    print(
        f"\n| network type ({result['repeats']} repeats, medians) | modules | "
        "merge s (multiplier 0.8) | restore s |"
    )
    print("|---|---:|---:|---:|")
    for row in result.get("types", []):
        print(f"| {row['type']} | {row['modules']} | {row['merge']:.4f} | {row['restore']:.4f} |")
    print(
        f"\n| one LoRA's weight schedule over {SCHEDULE_STEPS} steps | layers re-merged | "
        "added s/step (mean) | worst step s | vs one UNet step |"
    )
    print("|---|---:|---:|---:|---:|")
    for row in result.get("schedules", []):
        share = 100 * row["per_step"] / row["unet_step"]
        print(
            f"| {row['schedule']} | {row['layers_merged']} | {row['per_step']:.5f} | "
            f"{row['worst_step']:.5f} | {share:+.1f}% |"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny UNet, few repeats (CI)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure(args.quick, args.repeats)
    result["peak_rss_mb"] = peak_rss_mb()
    print_tables(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    main()
