// The ppoison operator library: every schema, defined once. Backends register their kernels
// with STABLE_TORCH_LIBRARY_IMPL in csrc/cpu/*.cpp (this module, ppoison_ext._C) and
// csrc/cuda/*.cu (ppoison_ext._C_cuda, loaded after it on a CUDA build of torch). Everything
// goes through PyTorch's stable ABI (stable.h), so one build loads into every torch from the
// target version on; both modules use only Python's limited API (abi3).
#include <Python.h>

#include "stable.h"

// `import ppoison_ext._C` loads this shared library, which runs the static registrations
// below; the module itself holds nothing.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

namespace ppoison {

STABLE_TORCH_LIBRARY(ppoison, m) {
  m.def("jacobian_gram_fc(Tensor p, Tensor h_sqnorm) -> Tensor");
  m.def("jacobian_tvec_fc(Tensor p, Tensor h, Tensor y) -> Tensor");
  m.def("jacobian_gram(Tensor G) -> Tensor");
  m.def("jacobian_tvec(Tensor G, Tensor y) -> Tensor");
  m.def(
      "mad_oracle(Tensor y, Tensor? p, Tensor? h_sqnorm, Tensor? gram, str oracle, bool objmax, "
      "int exact_max_k, int max_candidates, Tensor? index) -> (Tensor, Tensor)");
  m.def("mad_objective(Tensor y_tilde, Tensor y, Tensor? p, Tensor? h_sqnorm, Tensor? gram) -> (Tensor, Tensor)");
  m.def("mad_step(Tensor y, Tensor y_star, float epsilon, str ydist, int kl_steps) -> Tensor");
  m.def("project_simplex(Tensor v, float radius) -> Tensor");
  m.def("project_l1_ball(Tensor v, float radius) -> Tensor");
  m.def("grad2_allocate(Tensor p, Tensor c, float[] epsilons) -> Tensor");
  m.def("modelguard_w_solve(Tensor y, float epsilon, float margin, float log_offset) -> (Tensor, Tensor, Tensor)");
}

}  // namespace ppoison
