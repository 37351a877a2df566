// The SCOTT tokenizer's stage kernels over compact visible-patch activations: the entry points of
// the C++ CPU implementation and the CUDA one. Every index computation they share lives in the
// headers included below (stage_common.h, conv_operands.h, pool_ops.h), as host/device functions,
// so the CPU build (tested in CI against the dense reference) checks the exact logic the GPU
// kernels run.
//
// Layouts (the same as the triton backend's):
//   slot      (B, GH, GW) int32   grid position -> tile index, or -1 where the patch is masked
//   tile_pos  (M,)        int64   tile index -> flat grid position b * GH * GW + gy * GW + gx
//   compact activations (M, side, side, C), channel-last, one block per visible patch
//   images (B, C, H, W) with any strides, read in place (masking fused into the load)
//   conv weights as GEMM operands: forward (k, k, C_in, C_out), input gradient (k, k, C_out, C_in)
//
// A conv stage (stride 2, pad k/2, input patch side q, output side s = q/2) is three GEMMs:
//   forward  out[r, co] = relu(sum_kk window(r, kk) * w[kk, co])          r over M*s*s outputs
//            (the ReLU optional: the tokenizer leaves it to the pool, applied to its window maxima)
//   wgrad    dw[kk, co] = sum_r window(r, kk) * g'(r, co)                 g' = grad * relu'(out)
//   dgrad    din[p, ci] = sum_(ky,kx,co) g'(out pixel reading p via (ky,kx), co) * w[ky,kx,co,ci]
//            (per parity class of p: only a quarter of the taps can read a given pixel)
// with `window` gathering the input through `slot` (zero outside the image or in masked patches).
#pragma once

#include <cstdint>

#include "conv_operands.h"
#include "pool_ops.h"

namespace scott {

// ---- entry points ---------------------------------------------------------------------------------
// dtype: the compute dtype (activations, weights, gradients); src_dtype: the source's (may be
// uint8 for images, code 4). Every pointer is a device pointer for the CUDA versions.
constexpr int kUInt8 = 4;

// The implicit conv GEMMs on (default) or off: off, every stage runs the gather GEMM. Shared by the
// CUDA kernels and the C++ twin, so the twin tests can run either path.
bool& implicit_gemm_enabled();
// The tiled MaxBlurPool kernels on (default) or off (always the per-element ones); nullptr when a
// pool runs tiled, else why not (shape rules; CUDA adds its dtype rules in cuda_tiled_pool).
bool& tiled_pool_enabled();
const char* pool_refusal(const PoolGeometry& g);
// nullptr when a stage's GEMM `op` runs on the implicit path, else why not (shape rules; CUDA adds
// its dtype rules in cuda_implicit_conv).
enum class ConvOp : int { kForward = 0, kWeightGrad = 1, kInputGrad = 2 };
const char* conv_gemm_refusal(const StageGeometry& g, int64_t splits, ConvOp op);

// The compact layout's tables from a (batch, positions) keep mask (bytes, nonzero = visible) of rows
// holding num_visible visible patches each: slot (batch, positions) int32, tile_pos (batch *
// num_visible) int64 and, with radius >= 0, the neighbour table (batch * num_visible, 2r+1, 2r+1)
// int32 (row_neighbour in stage_common.h). Rows with another count still get in-range tables; the
// twin returns how many there are, the CUDA kernel fails the launch on the device (a trap).
int64_t visible_tables_cpu(const uint8_t* keep, int64_t batch, int64_t positions, int64_t num_visible,
                           int64_t grid_w, int32_t radius, int32_t* slot, int64_t* tile_pos, int32_t* nbr);

// relu: out = relu(conv), else the conv alone (then the pool after it takes the ReLU).
void conv_relu_cpu(const StageGeometry& g, DType dtype, int src_dtype, const void* src, const void* weight_t,
                   const void* norm, const int32_t* slot, const int64_t* tile_pos, void* out, bool relu);
void conv_relu_wgrad_cpu(const StageGeometry& g, DType dtype, int src_dtype, const void* src, const void* grad,
                         const void* out, const void* norm, const int32_t* slot, const int64_t* tile_pos,
                         void* grad_weight_t);
void conv_relu_dgrad_cpu(const StageGeometry& g, DType dtype, const void* grad, const void* out,
                         const void* weight_t, const int32_t* slot, const int64_t* tile_pos, void* grad_src);
// relu: the pool of relu(act), applied to the window maxima.
void max_blur_pool_cpu(const PoolGeometry& g, DType dtype, const void* act, const int32_t* slot,
                       const int64_t* tile_pos, void* out, bool relu);
// relu_mask: the gradient comes multiplied by relu'(act) (relu_passes), for act = relu(y) the gradient with
// respect to y (what both backward GEMMs of the conv before it read).
void max_blur_pool_backward_cpu(const PoolGeometry& g, DType dtype, const void* grad, const void* act,
                                const int32_t* slot, const int64_t* tile_pos, void* grad_act, bool relu_mask);

#ifdef SCOTT_WITH_CUDA
void visible_tables_cuda(const uint8_t* keep, int64_t batch, int64_t positions, int64_t num_visible, int64_t grid_w,
                         int32_t radius, int32_t* slot, int64_t* tile_pos, int32_t* nbr, void* stream);
void conv_relu_cuda(const StageGeometry& g, DType dtype, int src_dtype, const void* src, const void* weight_t,
                    const void* norm, const int32_t* slot, const int64_t* tile_pos, void* out, bool relu,
                    int32_t* nbr, void* stream);
// partial: (splits, K, C_out) accumulator-typed (float, or double for float64) buffer
void conv_relu_wgrad_cuda(const StageGeometry& g, DType dtype, int src_dtype, const void* src, const void* grad,
                          const void* out, const void* norm, const int32_t* slot, const int64_t* tile_pos,
                          void* partial, int64_t splits, int32_t* nbr, void* gmask, void* stream);
void conv_relu_dgrad_cuda(const StageGeometry& g, DType dtype, const void* grad, const void* out,
                          const void* weight_t, const int32_t* slot, const int64_t* tile_pos, void* grad_src,
                          int32_t* nbr, void* gmask, void* stream);
void max_blur_pool_cuda(const PoolGeometry& g, DType dtype, const void* act, const int32_t* slot,
                        const int64_t* tile_pos, void* out, bool relu, void* stream);
void max_blur_pool_backward_cuda(const PoolGeometry& g, DType dtype, const void* grad, const void* act,
                                 const int32_t* slot, const int64_t* tile_pos, void* grad_act, bool relu_mask,
                                 void* stream);
// The CUDA conv entry points take scratch: nbr (M, 9) int32 and, for the backward GEMMs, gmask
// (M, s, s, C_out) in the compute dtype; both used only on the implicit path (cuda_implicit_conv),
// gmask only when `out` is given. The backward GEMMs (CUDA and twin) take out == nullptr for a
// gradient already multiplied by relu'(out), then read it as is.
bool cuda_implicit_conv(const StageGeometry& g, DType dtype, int64_t splits, ConvOp op);
// whether the image weight gradient, on the current device, runs as clusters of two blocks that
// write one partial per cluster (the caller sizes its partials by this)
bool cuda_image_wgrad_clusters(DType dtype, int src_dtype);
// float16/bfloat16 GEMMs on tensor cores (default) or on the SIMT kernel (for comparison)
void set_tensor_cores(bool enabled);
bool cuda_tiled_pool(const PoolGeometry& g, DType dtype);
#endif

}  // namespace scott
