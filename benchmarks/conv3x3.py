"""A ResNet block's 3x3 convolution on CPU, forward + backward: direct (oneDNN) vs Winograd F(4x4, 3x3).

    python benchmarks/conv3x3.py --threads 2

Shapes are those of the 9-block generator at ngf 64 (256 channels) for 64, 128 and 256 px crops
(16, 32 and 64 px in the blocks), with 1 and 2 images (the step runs both). The two ways run in
alternation, so both see the same machine load. cyclegan.winograd.MIN_SIZE comes from this table.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from cyclegan import winograd
from cyclegan.device import keep_freed_memory


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--channels", type=int, nargs="+", default=[64, 256])
    p.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # as `cyclegan train` does on CPU
    if not winograd.available():
        raise SystemExit("the Winograd kernel could not be built here")
    print(f"# threads {torch.get_num_threads()}; ms per forward + backward, median of {args.iters}")
    print(f"{'ch':>4} {'px':>4} {'n':>2} {'direct':>8} {'winograd':>9} {'speedup':>8} {'max rel err':>12}")
    for c in args.channels:
        for size in args.sizes:
            for n in (1, 2):
                gen = torch.Generator().manual_seed(0)
                x = torch.randn(n, c, size + 2, size + 2, generator=gen, requires_grad=True)
                w = (torch.randn(c, c, 3, 3, generator=gen) * 0.02).requires_grad_()
                grad = torch.randn(n, c, size, size, generator=gen)
                ways = {"direct": lambda: F.conv2d(x, w), "winograd": lambda: winograd.conv3x3(x, w, None)}
                times: dict[str, list[float]] = {k: [] for k in ways}
                for i in range(args.iters + 2):
                    for name, fn in ways.items():
                        start = time.perf_counter()
                        fn().backward(grad)
                        if i >= 2:
                            times[name].append(time.perf_counter() - start)
                med = {k: sorted(v)[len(v) // 2] * 1000 for k, v in times.items()}
                with torch.no_grad():
                    ref = F.conv2d(x, w)
                    err = float((winograd.conv3x3(x, w, None) - ref).abs().max() / ref.abs().max())
                print(f"{c:>4} {size:>4} {n:>2} {med['direct']:>8.2f} {med['winograd']:>9.2f} "
                      f"{med['direct'] / med['winograd']:>7.2f}x {err:>12.1e}")


if __name__ == "__main__":
    main()
