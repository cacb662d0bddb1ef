// The only registration block of the compiled core: kernels for the schemas declared in
// cgidm/ops.py (which imports this module after declaring them), plus the bare Python
// module `cgidm._C` whose import runs these registrations.
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY_IMPL(cgidm, CPU, m) {
  m.impl("pair_noise", &cgidm::pair_noise);
  m.impl("pair_contrast_loss", &cgidm::pair_contrast_loss);
  m.impl("pgd_update", &cgidm::pgd_update);
  m.impl("draw_noise", &cgidm::draw_noise);
  m.impl("linf_update", &cgidm::linf_update);
}

#ifdef CGIDM_WITH_CUDA
TORCH_LIBRARY_IMPL(cgidm, CUDA, m) {
  m.impl("pair_noise", &cgidm::pair_noise);
  m.impl("pair_contrast_loss", &cgidm::pair_contrast_loss);
  m.impl("pgd_update", &cgidm::pgd_update);
  m.impl("draw_noise", &cgidm::draw_noise);
  m.impl("linf_update", &cgidm::linf_update);
}
#endif

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {
      PyModuleDef_HEAD_INIT, "_C", "cgidm's compiled kernels (registered as torch ops)", -1, nullptr};
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
  // What this build registers, read by cgidm/ops.py (has_cpp, has_cuda): one name per
  // m.impl line above, for CPU and, when WITH_CUDA, for CUDA.
  PyObject* kernels = Py_BuildValue("(sssss)", "pair_noise", "pair_contrast_loss", "pgd_update", "draw_noise",
                                    "linf_update");
#ifdef CGIDM_WITH_CUDA
  PyObject* with_cuda = Py_True;
#else
  PyObject* with_cuda = Py_False;
#endif
  if (kernels == nullptr || PyModule_AddObjectRef(m, "KERNELS", kernels) < 0 ||
      PyModule_AddObjectRef(m, "WITH_CUDA", with_cuda) < 0) {
    Py_XDECREF(kernels);
    Py_DECREF(m);
    return nullptr;
  }
  Py_DECREF(kernels);
  return m;
}
