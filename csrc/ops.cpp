// Every pyrebasin op's schema, in one place. Kernels register per device in csrc/cpu and csrc/cuda.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// A bare module so that `import pyrebasin._C` loads this library and runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(pyrebasin, m) {
  // Gathers every tensor along all of its permuted axes in one pass: indices[k] is applied to
  // tensors[owners[k]] along axis axes[k] (out = in.index_select(axis, index) for every such pair).
  m.def("permute_multi(Tensor[] tensors, Tensor[] indices, int[] owners, int[] axes) -> Tensor[]");
  // K = num_samples combinations out[i][k] = b[i] + lambda_k * (a[i] - b[i]), shape [K, *a[i].shape]:
  // element e of tensor i uses coefficient index coef_base[i] + (e / coef_div[i]) % coef_mod[i],
  // drawn in-kernel from (seed, sample_begin + k, index) by Philox-4x32-10 (see philox.h).
  m.def("combine_batched(Tensor[] a, Tensor[] b, int[] coef_base, int[] coef_div, int[] coef_mod, "
        "str distribution, float[] params, int seed, int sample_begin, int num_samples) -> Tensor[]");
  // Streaming moments of two activation streams (features along channel_dim, every other position
  // a sample; y=None: x with itself), added into float64 accumulators: count, Σx, Σy, Σx², Σy², Σxyᵀ.
  m.def("corr_accumulate(Tensor x, Tensor? y, int channel_dim, Tensor(a!) count, Tensor(b!) sum_x, "
        "Tensor(c!) sum_y, Tensor(d!) sum_xx, Tensor(e!) sum_yy, Tensor(f!) sum_xy) -> ()");
  // Minimum-cost assignment of a square float64 cost (CPU): col4row[i] = column of row i, with the
  // column duals v; passing a previous (v, col4row) warm-starts it (rows still tight keep their column).
  // No CUDA kernel: shortest augmenting paths are sequential (one Dijkstra per free row, each step
  // depending on the last), weight matching builds its costs on any device and solves them on the CPU,
  // and at n <= a few thousand a solve costs less than the GEMMs that build the cost.
  // maximize=True solves -cost without a negated copy (duals are those of -cost).
  m.def("lap_solve(Tensor cost, Tensor? v, Tensor? col4row, bool maximize=False) -> "
        "(Tensor col4row, Tensor v, Tensor augmentations)");
}
