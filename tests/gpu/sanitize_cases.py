"""Representative GPU workload for compute-sanitizer: every native (cuda) and triton kernel,
forward and backward, on masks with fully masked rows, single visible patches and odd shapes.

    bash tests/gpu/sanitize.sh          # memcheck and racecheck over this script
"""

import sys

import torch

from scott_kernels import sparse_conv_tokenize


def main() -> int:
    if not torch.cuda.is_available():
        print("sanitize_cases: needs a CUDA GPU", file=sys.stderr)
        return 2
    backends = sys.argv[1:] or ["cuda", "triton"]
    torch.manual_seed(0)
    cases = [  # (batch, height, width, patch, kernels, widths, dtype)
        (2, 64, 48, 16, (7, 7), (8, 12), torch.float32),
        (3, 32, 80, 16, (3, 5), (5, 7), torch.float16),
        (2, 224, 224, 16, (7, 7), (64, 384), torch.bfloat16),
        (1, 128, 64, 64, (5, 3, 7), (4, 5, 6), torch.float64),
    ]
    for backend in backends:
        for B, H, W, P, kernels, widths, dtype in cases:
            c_in, weights = 3, []
            for width, k in zip(widths, kernels):
                weights.append((torch.randn(width, c_in, k, k, device="cuda") * 0.1).to(dtype).requires_grad_())
                c_in = width
            x = torch.randn(B, 3, H, W, device="cuda", dtype=dtype, requires_grad=True)
            n = (H // P) * (W // P)
            keep = torch.rand(B, n, device="cuda") >= 0.5
            keep[0] = False                           # a fully masked row
            if B > 1:
                keep[1] = False
                keep[1, n // 2] = True                # a single visible patch
            for k in (None, keep):
                out = sparse_conv_tokenize(x, weights, k, patch_size=P, backend=backend)
                torch.autograd.grad(out.float().square().sum(), [x, *weights])
            torch.cuda.synchronize()
            print(f"{backend} {B}x{H}x{W} P{P} {dtype}: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
