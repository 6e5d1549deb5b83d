// The CUDA paged KV-cache kernels and launchers, compiled by g++ for the host emulation
// (FRUGAL_CUDA_EMU): the very file nvcc builds for sm_80 / sm_90a.
#include "cuda/paged_attention.cu"
