"""Side-by-side run of the tokenizer backends: time and error against the float64 reference.

    python -m scott_kernels.compare                 # CPU-sized defaults, or GPU ones when CUDA is present
    python -m scott_kernels.compare --batch 64 --embed-dim 384 --dtype bfloat16 --device cuda

Everything it needs is made in memory (random images and weights, random masks with an exact
number of visible patches per image); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from . import available_backends, build_info, reference_tokenize, sparse_conv_tokenize

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def exact_count_keep(batch: int, num_patches: int, mask_ratio: float, device, generator=None) -> torch.Tensor:
    """(B, N) bool with exactly round(N * (1 - mask_ratio)) visible patches per row, uniformly placed."""
    n_keep = max(0, min(num_patches, round(num_patches * (1.0 - mask_ratio))))
    ranks = torch.rand(batch, num_patches, generator=generator).argsort(dim=1).argsort(dim=1)
    return (ranks < n_keep).to(device)


def _median_ms(fn, device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run(args) -> list[dict]:
    device = torch.device(args.device)
    dtype = _DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(args.seed)
    P = 16
    n = (args.img_size // P) ** 2
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=gen).to(device)
    w_cpu = [torch.randn(args.hidden, 3, 7, 7, generator=gen) * (2 / 147) ** 0.5,
             torch.randn(args.embed_dim, args.hidden, 7, 7, generator=gen) * (2 / (49 * args.hidden)) ** 0.5]
    use_autocast = dtype in (torch.bfloat16, torch.float16) and device.type == "cuda"
    # Under autocast (GPU) the parameters stay float32 as in mixed-precision training.
    w_dtype = torch.float32 if use_autocast else dtype
    weights = [w.to(device, w_dtype).requires_grad_(True) for w in w_cpu]
    x_in = x.to(w_dtype)
    rows = []
    for ratio in args.mask_ratios:
        keep = None if ratio < 0 else exact_count_keep(args.batch, n, ratio, device, gen)
        exact = reference_tokenize(x.double(), [w.detach().double() for w in weights], keep, P)
        for backend in available_backends(device):
            def forward():
                with torch.autocast(device.type, dtype=dtype, enabled=use_autocast):
                    return sparse_conv_tokenize(x_in, weights, keep, patch_size=P, backend=backend)

            def forward_backward():
                out = forward()
                torch.autograd.grad(out.float().square().mean(), weights)

            with torch.no_grad():
                fwd = _median_ms(forward, device, args.warmup, args.repeats)
            fwd_bwd = _median_ms(forward_backward, device, args.warmup, args.repeats)
            with torch.no_grad():
                err = (forward().double() - exact).abs().max().item() / exact.abs().max().clamp_min(1e-30).item()
            rows.append(dict(mask="none (dense)" if keep is None else f"{ratio:.2f}", backend=backend,
                             fwd_ms=fwd, fwd_bwd_ms=fwd_bwd, rel_err=err))
    return rows


def main(argv=None) -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--batch", type=int, default=64 if cuda else 4)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--embed-dim", type=int, default=384 if cuda else 192)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="bfloat16" if cuda else "float32")
    p.add_argument("--mask-ratios", type=float, nargs="+", default=[-1, 0.0, 0.6, 0.75],
                   help="fractions of masked patches; -1 = keep=None (the dense path)")
    p.add_argument("--warmup", type=int, default=3 if cuda else 1)
    p.add_argument("--repeats", type=int, default=20 if cuda else 3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.img_size % 16:
        p.error(f"--img-size must be a multiple of the patch size 16, got {args.img_size}")

    info = build_info()
    device_name = info["cuda_device"] if args.device.startswith("cuda") else "CPU"
    print(f"scott_kernels: device {device_name}, torch {info['torch']}, native CUDA kernels: "
          f"{'yes (' + info['cuda_archs'] + ')' if info['cuda'] else 'no (C++ only)'}")
    print(f"B={args.batch} {args.img_size}x{args.img_size} D={args.embed_dim} hidden={args.hidden} "
          f"dtype={args.dtype}; median of {args.repeats} runs after {args.warmup} warm-up\n")
    rows = run(args)
    header = f"{'mask ratio':>13} {'backend':>10} {'fwd ms':>10} {'fwd+bwd ms':>11} {'speed-up':>9} {'max rel err':>12}"
    print(header)
    print("-" * len(header))
    base = {r["mask"]: r for r in rows if r["backend"] == "reference"}
    for r in rows:
        ref = base.get(r["mask"])
        speedup = f"{ref['fwd_bwd_ms'] / r['fwd_bwd_ms']:.2f}x" if ref else "-"
        print(f"{r['mask']:>13} {r['backend']:>10} {r['fwd_ms']:>10.2f} {r['fwd_bwd_ms']:>11.2f} "
              f"{speedup:>9} {r['rel_err']:>12.2e}")
    print("\nspeed-up: reference fwd+bwd time / this backend's; error: max |out - float64 reference| / max |reference|")


if __name__ == "__main__":
    main()
