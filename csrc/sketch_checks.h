// Argument checks shared by the entry points that take a key sketch.
#pragma once

#include <cstdint>

#include "hsr/sketch/key_sketch.h"

namespace hsr {

// The sketch layout for keys of `dim` channels, or a ValueError naming `what` (the group is
// clipped to dim, as sketch_keys does).
sketch::SketchLayout checked_layout(int64_t dim, int64_t bits, int64_t group, const char* what);

}  // namespace hsr
