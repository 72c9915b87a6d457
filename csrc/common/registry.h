// Each op's binding file adds its Python functions to seqrec_fast._C through this registry, so
// no shared file has to list the ops. bindings.cpp defines the module and runs every entry.
#pragma once
#include <functional>
#include <vector>

#include <torch/extension.h>

namespace seqrec_fast {

using BindFn = std::function<void(pybind11::module_&)>;

inline std::vector<BindFn>& binding_registry() {
  static std::vector<BindFn> fns;
  return fns;
}

struct RegisterBindings {
  explicit RegisterBindings(BindFn fn) { binding_registry().push_back(std::move(fn)); }
};

}  // namespace seqrec_fast

#define SEQREC_FAST_CHECK_SHAPE(x, ...)                                              \
  TORCH_CHECK((x).sizes() == torch::IntArrayRef({__VA_ARGS__}), #x " must have shape (" \
              #__VA_ARGS__ "), got ", (x).sizes())
