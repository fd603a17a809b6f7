// Shapes and dtypes in error messages as Python prints them, so that messages raised in C++
// read like the Python layer's ("(1, 3, 1, 64)", "torch.bfloat16").
#pragma once

#include <ATen/core/Tensor.h>

#include <sstream>
#include <string>

namespace hsr {

// A shape as Python prints a tuple: "(1, 3, 1, 64)", "(5,)".
inline std::string python_shape(at::IntArrayRef sizes) {
  std::ostringstream s;
  s << '(';
  for (size_t i = 0; i < sizes.size(); ++i) s << (i ? ", " : "") << sizes[i];
  s << (sizes.size() == 1 ? ",)" : ")");
  return s.str();
}

// A dtype as Python prints it ("torch.bfloat16"), so that messages read like the Python layer's.
inline std::string python_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
}

}  // namespace hsr
