#include "knobs.h"

namespace frugal::cpu {
namespace {

constexpr KnobInfo kInfos[] = {
#define FRUGAL_KNOB_INFO(name, def, lo, hi, doc) {#name, def, lo, hi, doc},
    FRUGAL_CPU_KNOBS(FRUGAL_KNOB_INFO)
#undef FRUGAL_KNOB_INFO
};

struct Overrides {
  int64_t v[kKnobCount];
  Overrides() {
    for (auto& x : v) x = -1;
  }
};

thread_local Overrides overrides;

}  // namespace

int64_t knob(Knob k) {
  const int i = static_cast<int>(k);
  const int64_t o = overrides.v[i];
  return o >= 0 ? o : kInfos[i].def;
}

const KnobInfo* knob_infos() { return kInfos; }

int64_t set_knob_override(int i, int64_t value) {
  const int64_t previous = overrides.v[i];
  overrides.v[i] = value < 0 ? -1 : value;
  return previous;
}

}  // namespace frugal::cpu
