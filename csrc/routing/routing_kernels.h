// CUDA kernels of capsule routing (MIND / ComiRec-DR): the plain C++ interface.
//
// Framework-free: raw pointers, element strides and sizes, no torch headers. The kernels live in
// routing_kernels.cuh and are instantiated once per element type in
// routing_{fp32,bf16,fp16}_kernels.cu; the torch binding (routing_cuda.cu) and the CUDA unit test
// (csrc/tests/test_routing_cuda.cu) call them through this header. Semantics are those of
// routing_core.h (the CPU kernel), row by row.
//
// Use: fill RoutingParams, call routing_cuda_plan(), allocate plan.workspace_bytes of device memory
// when it is non-zero (params.workspace), then routing_cuda_launch() on a stream.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace seqrec_fast {
namespace routing_cuda {

// Element type of u, v, grad_v and grad_u (accumulation is always fp32).
enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// kForward: v, c_last, s_last from u.
// kBackwardDetached: grad_u from grad_v, c_last, s_last (iterations before the last detached).
// kBackwardFull: grad_u from grad_v and u, recomputing the iterations (no detach).
enum class Pass : int { kForward = 0, kBackwardDetached = 1, kBackwardFull = 2 };

// One batch row b of the problem: K interests, L positions, capsule dim d, `iters` iterations.
// All strides are in elements; the innermost dimension (d, or L for mask / init / c) has stride 1.
struct RoutingParams {
  int64_t B = 0, K = 1, L = 1, d = 1, iters = 3;
  bool seq_axis = false;  // softmax over the real positions (true) or over the interests (false)
  bool seq_all = false;   // with seq_axis: the softmax over all L positions, padded ones included
                          // (torch-rechub); c is zeroed at padded positions afterwards
  bool shared = false;    // u_hat identical for every interest (MIND); else per (k, l) (ComiRec-DR)

  // u_hat (b, k, l, j) at u[b*u_sb + k*u_sk + l*u_sl + j]; u_sk is ignored when shared.
  //   shared u (B, L, d) contiguous:        u_sb = L*d, u_sl = d
  //   per-position u (L, B, K, d) contiguous: u_sb = K*d, u_sk = d, u_sl = B*K*d
  // Needed by kForward and kBackwardFull.
  const void* u = nullptr;
  int64_t u_sb = 0, u_sk = 0, u_sl = 0;

  const bool* mask = nullptr;  // (B, L): mask[b*mask_sb + l], true at real positions
  int64_t mask_sb = 0;
  // (B, K, L) initial logits at init[b*init_sb + k*init_sk + l], or null (zeros)
  const float* init = nullptr;
  int64_t init_sb = 0, init_sk = 0;

  // kForward outputs, contiguous: v (B, K, d) in the element type; c_last (B, K, L) and s_last
  // (B, K, d) in fp32 (c and s of the last iteration; c is 0 at padded positions).
  void* v = nullptr;
  float* c_last = nullptr;
  float* s_last = nullptr;

  // Backward inputs: grad_v (B, K, d) contiguous, element type; c_in / s_in: the forward's c_last /
  // s_last (kBackwardDetached only).
  const void* grad_v = nullptr;
  const float* c_in = nullptr;
  const float* s_in = nullptr;
  // Backward output grad_u (b, k, l, j) at grad_u[b*g_sb + k*g_sk + l*g_sl + j] in the element
  // type; shared: summed over k (g_sk ignored); every element written (zeros at padded positions).
  void* grad_u = nullptr;
  int64_t g_sb = 0, g_sk = 0, g_sl = 0;

  // Device scratch of plan.workspace_bytes (only when that is non-zero), 256-byte aligned.
  void* workspace = nullptr;

  int threads = 0;  // threads per block; 0 = automatic (a multiple of 32 up to 1024 otherwise)
};

// How a launch runs; computed by routing_cuda_plan() for the current device.
struct RoutingPlan {
  int threads = 0;           // threads per block (one block works on one batch row at a time)
  int grid = 0;              // blocks (persistent: block i handles rows i, i + grid, ...)
  size_t smem_bytes = 0;     // dynamic shared memory per block
  size_t workspace_bytes = 0;  // device scratch the caller provides (0: none needed)
  bool staged = false;       // the row's u tile is copied into shared memory once per row
  bool state_in_smem = true;  // logits / couplings / capsules in shared memory (else workspace)
  bool vec = false;          // 16-byte vector loads / stores of the element type from global memory
};

// Per element type (defined in routing_{fp32,bf16,fp16}_kernels.cu).
cudaError_t routing_cuda_plan_fp32(Pass pass, const RoutingParams& p, RoutingPlan* plan);
cudaError_t routing_cuda_plan_bf16(Pass pass, const RoutingParams& p, RoutingPlan* plan);
cudaError_t routing_cuda_plan_fp16(Pass pass, const RoutingParams& p, RoutingPlan* plan);
cudaError_t routing_cuda_launch_fp32(Pass pass, const RoutingParams& p, const RoutingPlan& plan,
                                     cudaStream_t stream);
cudaError_t routing_cuda_launch_bf16(Pass pass, const RoutingParams& p, const RoutingPlan& plan,
                                     cudaStream_t stream);
cudaError_t routing_cuda_launch_fp16(Pass pass, const RoutingParams& p, const RoutingPlan& plan,
                                     cudaStream_t stream);

// Fills *plan for running `pass` on the current device. Errors: cudaErrorInvalidValue for bad
// sizes or pointers, or the error of a device query.
inline cudaError_t routing_cuda_plan(Pass pass, DType dt, const RoutingParams& p,
                                     RoutingPlan* plan) {
  switch (dt) {
    case DType::kFloat32: return routing_cuda_plan_fp32(pass, p, plan);
    case DType::kBFloat16: return routing_cuda_plan_bf16(pass, p, plan);
    case DType::kFloat16: return routing_cuda_plan_fp16(pass, p, plan);
  }
  return cudaErrorInvalidValue;
}

// Launches `pass` on `stream` as planned (asynchronous; returns the launch error, if any).
inline cudaError_t routing_cuda_launch(Pass pass, DType dt, const RoutingParams& p,
                                       const RoutingPlan& plan, cudaStream_t stream) {
  switch (dt) {
    case DType::kFloat32: return routing_cuda_launch_fp32(pass, p, plan, stream);
    case DType::kBFloat16: return routing_cuda_launch_bf16(pass, p, plan, stream);
    case DType::kFloat16: return routing_cuda_launch_fp16(pass, p, plan, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace routing_cuda
}  // namespace seqrec_fast
