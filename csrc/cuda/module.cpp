// `import ppoison_ext._C_cuda` loads the CUDA kernels (csrc/cuda/*.cu register them with the
// dispatcher on load; the schemas are ppoison_ext._C's). A library apart from _C, so that the
// CPU kernels load into a CPU build of torch, which has no libtorch_cuda or libcudart.
#include <Python.h>
#include <cuda_runtime_api.h>

PyMODINIT_FUNC PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  // The CUDA runtime this was built with (e.g. 13000), checked against torch's at import.
  if (module != nullptr && PyModule_AddIntConstant(module, "cuda_version", CUDART_VERSION) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
