// The emulator's knobs and errors, for torch-facing code: this header pulls in none of the
// CUDA keyword macros of emu.h, so it can sit beside the torch headers.
#pragma once

#include <cstdint>

namespace frugal::emu {

enum class Schedule : int { kForward = 0, kReverse = 1, kShuffle = 2 };
void set_schedule(Schedule s, uint64_t seed);
Schedule schedule();
uint64_t schedule_seed();
void set_host_threads(int n);
int host_threads();
void set_blocks_per_sm(int n);
int blocks_per_sm();
const char* last_error();

// Runs the emulator self-test kernel `name` (csrc/cuda_emu/selftest.cpp) on x[0, n) with
// argument arg, writing at most out_capacity floats to out; returns the CUDA error code (0: ok)
// and sets *out_n. An unknown name returns -1.
int run_selftest(const char* name, const float* x, int64_t n, int64_t arg, float* out,
                 int64_t out_capacity, int64_t* out_n);

}  // namespace frugal::emu
