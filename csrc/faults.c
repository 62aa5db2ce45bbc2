#include "native.h"
int tm_faults_init(PyObject *module) { (void)module; return 0; }
