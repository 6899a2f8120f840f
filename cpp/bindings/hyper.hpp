// THE hyper-parameter table: one row per hyper-parameter per algorithm. It serves the
// functional calls' keyword arguments, param-group dicts read by name, and fills the
// kernel's AdamHyperparams / SgdHyperparams. Adding a hyper-parameter = one row here,
// the Hyperparams field and its kernel scalars (types.hpp), and reference.py.
#pragma once

#include <pybind11/pybind11.h>

#include <cstddef>
#include <string>

#include "fastadam/types.hpp"

namespace fastadam::bindings {

namespace py = pybind11;

// Who reads the values, for error messages: "adam_step()", "Adam.step(): param_groups[1]".
struct Where {
    const char* fn;
    std::ptrdiff_t group = -1;  // >= 0: a param group of fn
    std::string str() const { return group < 0 ? fn : std::string(fn) + ": param_groups[" + std::to_string(group) + "]"; }
};

enum class Rule {
    real,         // a finite real number
    nonnegative,  // a finite real number >= 0
    unit_pair,    // a pair (a, b), both in [0, 1)
    flag,         // True or False (numpy.bool too)
};

template <class H>
struct HyperRow {
    const char* name;
    Rule rule;
    double H::*value;   // real, nonnegative; the first of a unit_pair
    double H::*second;  // the second of a unit_pair
    bool H::*flag;      // flag
    bool required;      // no default in the functional calls
    const char* doc;
};

template <class H>
struct HyperTable {
    const char* kind;  // "adam", "sgd"
    const HyperRow<H>* rows;
    std::size_t size;
    void (*cross_check)(const H&, const Where&);  // rules between fields, or nullptr
    PyObject* const* keys;                         // rows' names, interned: dict look-ups by pointer
};

template <class H>
const HyperTable<H>& hyper_table();
template <>
const HyperTable<AdamHyperparams>& hyper_table<AdamHyperparams>();
template <>
const HyperTable<SgdHyperparams>& hyper_table<SgdHyperparams>();

// values[k]: the argument for row k, or a null handle for the field's default.
template <class H>
H hyper_from_args(const py::handle* values, const Where& where);

// Every row read by name from a param group (a dict or other mapping; keys the table
// does not know, such as torch's foreach/fused, are ignored), validated, into h.
template <class H>
void hyper_from_group(H& h, PyObject* group, const Where& where);

// _core._check_group(kind, group, where) and _core._hyper_names(kind).
void check_group(const std::string& kind, py::handle group, const std::string& where);
py::tuple hyper_names(const std::string& kind);

}  // namespace fastadam::bindings
