// Capsule routing CUDA kernels, float32 instantiation (see routing_kernels.cuh). One element
// type per file, so that the three compile in parallel.
#include "routing/routing_kernels.cuh"

SEQREC_FAST_ROUTING_CUDA_INSTANTIATE(fp32, F32)
