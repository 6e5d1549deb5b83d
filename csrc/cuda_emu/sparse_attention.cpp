// The CUDA block-sparse attention forward and its launcher, compiled by g++ for the host
// emulation (FRUGAL_CUDA_EMU): the very file nvcc builds for sm_80 / sm_90a.
#include "cuda/sparse_attention.cu"
