"""Speed and memory of one CycleGAN training step (G_A, G_B, D_A, D_B updates) at several sizes.

    python benchmarks/train_step.py --threads 2 --netG resnet_9blocks --ngf 64 --sizes 64 128 256

Each size runs in its own process, so the peak memory of one size is not the high-water mark
of a previous one. CPU peak memory is the process's maximum resident set (it includes ~0.5 GB of
interpreter and libraries, and every mode's model); CUDA peak memory is that of each mode's
steps (torch.cuda.max_memory_allocated, every mode's weights resident). Inputs are random images; the step is the one `cyclegan train`
runs (cyclegan.model.CycleGAN.train_step, set up as training does by cyclegan.runtime), with the pools
and optimizers it uses.

Reference, the authors' code on a 2-core CPU (2 threads, resnet_9blocks, ngf 64, batch 1):
0.96 s/iter at 64 px, 2.77 at 128, 10.09 at 256. On a shared machine absolute timings move with
the load; --authors-baseline times the authors' way of running the same step (separate network
calls, per-tensor Adam) in alternation with ours, so the ratio of the two is robust to it.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

OFFICIAL_CPU_S_PER_ITER = {64: 0.96, 128: 2.77, 256: 10.09}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="train.precision: auto and fp32 = fp32 (TF32 convolutions on GPUs), bf16 = bf16 "
                        "autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    p.add_argument("--netG", default="resnet_9blocks")
    p.add_argument("--netD", default="basic")
    p.add_argument("--ngf", type=int, default=64)
    p.add_argument("--ndf", type=int, default=64)
    p.add_argument("--norm", default="instance")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--iters", type=int, default=5, help="timed steps per size")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocator, cuDNN, compile)")
    p.add_argument("--separate-calls", action="store_true",
                   help="no batching of calls of one network (6 G and 4 D calls, not 3 and 2)")
    p.add_argument("--authors-baseline", action="store_true",
                   help="also time the step as the authors' code runs it (separate network calls, "
                        "per-tensor Adam), alternating step by step with ours so both see the same load")
    p.add_argument("--modes", nargs="+", metavar="MODE",
                   help="time several ways of running the step in alternation, one step of each in turn: "
                        "fp32, bf16, bf16+channels_last, bf16+compile, fp32+separate, authors, ... (default: "
                        "the one --precision/--compile/--channels-last/--separate-calls name, and authors "
                        "with --authors-baseline)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)  # one size, JSON out
    return p.parse_args(argv)


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_modes(args: argparse.Namespace, size: int) -> dict:
    """Each mode's model, then one timed step of each in turn, so all see the same conditions.

    On CUDA the peak memory of a mode is that of its steps, with every mode's weights resident.
    """
    import torch

    from cyclegan.config import config_from_dict
    from cyclegan.distributed import Distributed
    from cyclegan.errors import UserError
    from cyclegan.model import CycleGAN
    from cyclegan.runtime import build_model, configure_torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device, cuda = torch.device(args.device), args.device == "cuda"
    configure_torch(config_from_dict({"train": {"device": args.device}}), device, rank=0)  # as training does
    models, results = {}, {}
    for mode in args.modes:
        options = set(mode.split("+"))
        unknown = options - {"fp32", "bf16", "channels_last", "compile", "separate", "authors"}
        if unknown:
            raise SystemExit(f"--modes {mode}: unknown {sorted(unknown)}")
        cfg = config_from_dict({
            "data": {"load_size": size, "crop_size": size},
            "model": {"netG": args.netG, "netD": args.netD, "ngf": args.ngf, "ndf": args.ndf, "norm": args.norm},
            "train": {"batch_size": args.batch_size, "device": args.device,
                      "precision": "bf16" if "bf16" in options else "fp32",
                      "compile": "compile" in options, "channels_last": "channels_last" in options}})
        try:
            if "authors" in options:  # separate network calls, per-tensor Adam, fp32, nothing else
                model = CycleGAN(cfg, device)
                model.batch_generators = model.batch_discriminators = False
                for opt in (model.opt_G, model.opt_D):
                    for group in opt.param_groups:
                        group["fused"], group["foreach"] = False, False
            else:
                model = build_model(cfg, device, Distributed())
                if "separate" in options:  # no batching of one network's calls: 6 G and 4 D calls
                    model.batch_generators = model.batch_discriminators = False
        except UserError as e:
            results[mode] = {"error": str(e)}
            continue
        gen = torch.Generator().manual_seed(0)
        shape = (args.batch_size, 3, size, size)
        batch = [(torch.rand(shape, generator=gen) * 2 - 1).to(device).contiguous(memory_format=model.memory_format)
                 for _ in range(2)]
        models[mode] = (model, batch)

    def step(mode: str) -> tuple[float, float]:
        model, (real_A, real_B) = models[mode]
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        model.train_step(real_A, real_B)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0

    for mode in models:  # warm-up: allocator, cuDNN autotuning, compilation
        for _ in range(args.warmup):
            step(mode)
    times: dict[str, list[float]] = {m: [] for m in models}
    peaks: dict[str, float] = dict.fromkeys(models, 0.0)
    for _ in range(args.iters):
        for mode in models:
            seconds, peak = step(mode)
            times[mode].append(seconds)
            peaks[mode] = max(peaks[mode], peak)
    for mode, t in times.items():
        t.sort()
        median = t[len(t) // 2]
        results[mode] = {"s_per_iter": median, "min_s": t[0], "max_s": t[-1],
                         "images_per_s": args.batch_size / median,
                         "peak_gib": peaks[mode] if cuda else max_rss_mib() / 1024}
    return {"size": size, "device": args.device, "modes": results,
            "gpu": torch.cuda.get_device_name() if cuda else None, "torch": torch.__version__}


def print_modes(r: dict) -> None:
    reference = OFFICIAL_CPU_S_PER_ITER.get(r["size"]) if r["device"] == "cpu" else None
    for mode, m in r["modes"].items():
        if "error" in m:
            print(f"{r['size']:>5}  {mode:<22} n/a: {m['error']}")
        else:
            print(f"{r['size']:>5}  {mode:<22} {m['s_per_iter']:>8.4f} {m['min_s']:>7.4f} {m['max_s']:>7.4f} "
                  f"{m['images_per_s']:>8.2f} {m['peak_gib']:>9.2f}  {reference or '-'}")


def default_modes(args: argparse.Namespace) -> list[str]:
    """The mode the single-setting flags name, and the authors' way with --authors-baseline."""
    ours = "+".join(["bf16" if args.precision == "bf16" else "fp32"]
                    + [name for name, on in (("channels_last", args.channels_last), ("compile", args.compile),
                                             ("separate", args.separate_calls)) if on])
    return [ours, "authors"] if args.authors_baseline else [ours]


def main() -> None:
    args = parse_args()
    args.modes = args.modes or default_modes(args)
    if args.child is not None:
        print(json.dumps(run_modes(args, args.child)))
        return
    load = os.getloadavg()
    print(f"# {args.netG} ngf {args.ngf} ndf {args.ndf} batch {args.batch_size} on {args.device}, "
          f"threads {args.threads or 'default'}; load average before: {load[0]:.2f} {load[1]:.2f} "
          f"{load[2]:.2f} "
          f"on {os.cpu_count()} cores")
    print(f"{'size':>5}  {'mode':<22} {'s/iter':>8} {'min':>7} {'max':>7} {'img/s':>8} {'peak GiB':>9}  "
          f"official CPU s/iter")
    results = []
    for size in args.sizes:
        # Each size in its own process: the peak memory of one is not the high-water mark of another.
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", str(size)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{size:>5} failed: {(out.stderr.strip().splitlines() or [out.returncode])[-1]}")
            results.append({"size": size, "error": out.stderr.strip()[-2000:]})
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print_modes(r)
        results.append(r)
    load = os.getloadavg()
    print(f"# load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
