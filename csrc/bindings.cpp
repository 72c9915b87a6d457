// Python module seqrec_fast._C: collects the functions every op registered (common/registry.h).
#include "common/registry.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "seqrec_fast C++/CUDA kernels";
#ifdef SEQREC_FAST_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  for (auto& fn : seqrec_fast::binding_registry()) fn(m);
}
