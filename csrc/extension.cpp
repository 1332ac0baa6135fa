// The Python module lskd._C. Importing it loads this library and with it the registrations of
// every op file (csrc/<op>.cpp: schemas and autograd; csrc/cpu, csrc/cuda: kernels).
#include <Python.h>

#include "md_masks.h"

namespace {

// _set_quantile_rank_rule(rule: int) -> None: the quantile rank rule of lskd::md_masks' kernels
// (-1: as this torch; 0 / 1: float32 / float64 ranks). For tests of both rules; not an op.
PyObject* set_quantile_rank_rule(PyObject* /*self*/, PyObject* arg) {
  const long rule = PyLong_AsLong(arg);
  if (rule == -1 && PyErr_Occurred()) return nullptr;
  lskd::set_quantile_rank_rule(static_cast<int>(rule));
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"_set_quantile_rank_rule", set_quantile_rank_rule, METH_O, "Test hook: lskd::md_masks' quantile rank rule."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}
