"""Representative GPU workload for compute-sanitizer: every native (cuda) and triton kernel,
forward and backward, on masks with fully masked rows, single visible patches and odd shapes.

    bash tests/gpu/sanitize.sh          # memcheck and racecheck over this script
    python tests/gpu/sanitize_cases.py --cpu    # the same driver on the CPU, smallest case only

``--cpu`` is the dry walk of tests/gpu/check.sh: no sanitizer exists there, but running the case
loop keeps this script from rotting. On the CPU the cuda backend's ops run their C++ twin, and
triton runs only under its interpreter (TRITON_INTERPRET=1, set here before triton is imported).
"""

import argparse
import os
import sys

import torch

CASES = [  # (batch, height, width, patch, kernels, widths, dtype)
    (2, 64, 48, 16, (7, 7), (8, 12), torch.float32),
    (3, 32, 80, 16, (3, 5), (5, 7), torch.float16),
    (2, 224, 224, 16, (7, 7), (64, 384), torch.bfloat16),
    (1, 128, 64, 64, (5, 3, 7), (4, 5, 6), torch.float64),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("backends", nargs="*", metavar="BACKEND", help="cuda and/or triton (default: both)")
    p.add_argument("--cpu", action="store_true", help="run the smallest case on the CPU (no sanitizer there)")
    args = p.parse_args(argv)
    args.backends = args.backends or ["cuda", "triton"]
    if set(args.backends) - {"cuda", "triton"}:
        p.error(f"backends must be cuda and/or triton, got {args.backends}")
    if args.cpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        print("sanitize_cases: needs a CUDA GPU (or --cpu)", file=sys.stderr)
        return 2

    from scott_kernels import sparse_conv_tokenize
    from scott_kernels.cuda_backend import cuda_tokenize

    device = "cpu" if args.cpu else "cuda"
    cases = CASES[:1] if args.cpu else CASES
    torch.manual_seed(0)
    for backend in args.backends:
        for B, H, W, P, kernels, widths, dtype in cases:
            c_in, weights = 3, []
            for width, k in zip(widths, kernels):
                weights.append((torch.randn(width, c_in, k, k, device=device) * 0.1).to(dtype).requires_grad_())
                c_in = width
            x = torch.randn(B, 3, H, W, device=device, dtype=dtype, requires_grad=True)
            n = (H // P) * (W // P)
            keep = torch.rand(B, n, device=device) >= 0.5
            keep[0] = False                           # a fully masked row
            if B > 1:
                keep[1] = False
                keep[1, n // 2] = True                # a single visible patch
            for k in (None, keep):
                if backend == "cuda" and device == "cpu":   # the kernels' C++ twin
                    out = cuda_tokenize(x, weights, k, P)
                else:
                    out = sparse_conv_tokenize(x, weights, k, patch_size=P, backend=backend)
                torch.autograd.grad(out.float().square().sum(), [x, *weights])
            if device == "cuda":
                torch.cuda.synchronize()
            print(f"{backend} {B}x{H}x{W} P{P} {dtype}: ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
