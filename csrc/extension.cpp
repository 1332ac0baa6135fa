// The Python module lskd._C. Importing it loads this library and with it the registrations of
// every op file (csrc/<op>.cpp: schemas and autograd; csrc/cpu, csrc/cuda: kernels).
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
