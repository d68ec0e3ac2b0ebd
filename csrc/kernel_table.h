// How every op's device kernels are registered. Each op has one kernel-table
// struct (GruKernels, TrKernels, SclaKernels: what a device implements) and a
// device-independent driver per schema (csrc/<op>.cpp: argument checks,
// allocation, the device-independent math) whose first parameter is that
// table. A device file (csrc/cpu/<op>_cpu.cpp, csrc/cuda/<op>_cuda.cu) fills
// one constexpr table and registers, for each schema,
//     m.impl("op", with_kernels<op_driver, kTable>);
// the driver with the table bound: its other parameters are the schema's.
#pragma once

#include <utility>

namespace cascla {

template <typename DriverPtr>
struct KernelAdaptor;

template <typename Table, typename Ret, typename... Args>
struct KernelAdaptor<Ret (*)(const Table&, Args...)> {
  template <Ret (*Driver)(const Table&, Args...), const Table& Kernels>
  static Ret call(Args... args) {
    return Driver(Kernels, std::forward<Args>(args)...);
  }
};

template <auto Driver, const auto& Kernels>
inline constexpr auto with_kernels =
    &KernelAdaptor<decltype(Driver)>::template call<Driver, Kernels>;

}  // namespace cascla
