// Compiled once per SIMD target by CMakeLists.txt, with -DFASTADAM_ISA_NS=<target>
// and that target's -m flags. It only instantiates the loops of kernels.hpp; the
// dispatcher (dispatch.cpp) picks one target's table at run time.
// (extern: a namespace-scope const would otherwise have internal linkage.)
#include "fastadam/kernels.hpp"
#include "isa_table.hpp"

namespace fastadam {
namespace FASTADAM_ISA_NS {

extern const KernelTable kernel_table = {
    &adam_segment<float>,
    &adam_segment<double>,
    &sgd_segment<float>,
    &sgd_segment<double>,
    &lane_sqrt_f32,
    &adam_mixed_segment,
    &grad_sq_block,
    &quantize_codes,
    &quantize_blockwise,
    &dequantize_blockwise,
};

}  // namespace FASTADAM_ISA_NS
}  // namespace fastadam
