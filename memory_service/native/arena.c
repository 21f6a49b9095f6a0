/* memory_service.native._arena */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static PyMethodDef methods[] = {{NULL, NULL, 0, NULL}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_arena", NULL, -1, methods};
PyMODINIT_FUNC PyInit__arena(void) { return PyModule_Create(&module); }
