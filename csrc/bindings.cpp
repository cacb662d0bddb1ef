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
}

#ifdef CGIDM_WITH_CUDA
TORCH_LIBRARY_IMPL(cgidm, CUDA, m) {
  m.impl("pair_noise", &cgidm::pair_noise);
  m.impl("pair_contrast_loss", &cgidm::pair_contrast_loss);
  m.impl("pgd_update", &cgidm::pgd_update);
}
#endif

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {
      PyModuleDef_HEAD_INIT, "_C", "cgidm's compiled kernels (registered as torch ops)", -1, nullptr};
  return PyModule_Create(&module);
}
