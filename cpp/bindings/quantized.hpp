// Quantized states' own functions: the code books, whole-state quantization (the
// optimizers' conversions to and from float32 states) and the quantizer's self-check.
#pragma once

#include <pybind11/pybind11.h>

namespace fastadam::bindings {

void register_quantized(pybind11::module_& m);

}  // namespace fastadam::bindings
