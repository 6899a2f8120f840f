// _core._StepGuard: lets one step of an optimizer run at a time, and refuses a second
// thread's step. A context manager written in C++ so that no Python bytecode runs between
// taking it and the protected block, or between the block and its release: Python raises
// a KeyboardInterrupt only between bytecodes, and one landing inside a Python __enter__
// left the guard taken for good (docs/design.md, "Threads, signals, fork and exit").
#pragma once

#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>
#include <utility>

namespace fastadam::bindings {

class StepGuard {
public:
    explicit StepGuard(std::string name) : name_(std::move(name)) {}
    // Called with the GIL held, as every method of a pybind11 class: no other lock needed.
    void enter() {
        if (busy_) throw std::runtime_error(name_ + ": another thread is running a step of this optimizer");
        busy_ = true;
    }
    bool exit(const pybind11::args&) {
        busy_ = false;
        return false;  // exceptions propagate
    }

private:
    std::string name_;
    bool busy_ = false;
};

}  // namespace fastadam::bindings
