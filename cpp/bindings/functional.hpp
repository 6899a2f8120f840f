// The functional API (adam_step, adam_step_multi, sgd_step) as METH_FASTCALL methods,
// and the test hook that calls one kernel piece directly.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

namespace fastadam::bindings {

// Null-terminated, for PyModule_AddFunctions.
PyMethodDef* functional_methods();

// _grad_sq_block_sums(grads, grad_scale): the norm pass's block sums, float64, in its order.
pybind11::array_t<double> grad_sq_block_sums(const pybind11::handle& grads, const pybind11::handle& grad_scale);

// Test hook (tests/test_exact_sqrt.py): the square root of the current path's FMA lanes.
void lane_sqrt(const pybind11::array& x, pybind11::array& out, const pybind11::object& estimate);

}  // namespace fastadam::bindings
