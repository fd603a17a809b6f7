# Locate torch through the interpreter that builds hsr, and wrap its libraries as two
# interface targets. torch's own TorchConfig.cmake is not used: on a CUDA build of torch it
# hard-requires a CUDA toolkit (nvrtc, cuDNN, cuSPARSE headers) even for a CPU-only build of
# an extension, and it injects an arch list that CUDA 13 rejects. hsr needs only the headers,
# c10 and torch_cpu (plus c10_cuda for streams on the CUDA side).
#
# Sets: TORCH_VERSION, TORCH_CUDA_VERSION (empty for a CPU-only torch), TORCH_ROOT.
# Targets: hsr_torch_cpu, hsr_torch_cuda.

if(NOT Python_EXECUTABLE)
  find_package(Python REQUIRED COMPONENTS Interpreter)
endif()

execute_process(
  COMMAND "${Python_EXECUTABLE}" -c
    "import os, torch; print(torch.__version__); print(torch.version.cuda or ''); print(os.path.dirname(torch.__file__)); print(int(torch._C._GLIBCXX_USE_CXX11_ABI))"
  OUTPUT_VARIABLE _torch_info
  ERROR_VARIABLE _torch_err
  RESULT_VARIABLE _torch_rc
  OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT _torch_rc EQUAL 0)
  message(FATAL_ERROR
    "hsr: cannot import torch with ${Python_EXECUTABLE}:\n${_torch_err}\n"
    "Install torch first and build without build isolation: "
    "pip install --no-build-isolation .")
endif()
string(REPLACE "\n" ";" _torch_info "${_torch_info}")
list(GET _torch_info 0 TORCH_VERSION)
list(GET _torch_info 1 TORCH_CUDA_VERSION)
list(GET _torch_info 2 TORCH_ROOT)
list(GET _torch_info 3 _torch_cxx11_abi)
message(STATUS "hsr: torch ${TORCH_VERSION} at ${TORCH_ROOT} (CUDA: '${TORCH_CUDA_VERSION}')")

function(_hsr_torch_library var name)
  find_library(${var} NAMES ${name} PATHS "${TORCH_ROOT}/lib" NO_DEFAULT_PATH)
  if(NOT ${var})
    message(FATAL_ERROR "hsr: lib${name}.so not found in ${TORCH_ROOT}/lib")
  endif()
endfunction()

_hsr_torch_library(HSR_LIBC10 c10)
_hsr_torch_library(HSR_LIBTORCH_CPU torch_cpu)
add_library(hsr_torch_cpu INTERFACE)
target_include_directories(hsr_torch_cpu SYSTEM INTERFACE
  "${TORCH_ROOT}/include" "${TORCH_ROOT}/include/torch/csrc/api/include")
target_compile_definitions(hsr_torch_cpu INTERFACE _GLIBCXX_USE_CXX11_ABI=${_torch_cxx11_abi})
target_link_libraries(hsr_torch_cpu INTERFACE "${HSR_LIBC10}" "${HSR_LIBTORCH_CPU}")
# at::parallel_for is a header template that uses `#pragma omp parallel` when torch was built
# with OpenMP (AT_PARALLEL_OPENMP); without -fopenmp here it silently runs on one thread. At
# run time libgomp.so.1 resolves to the copy torch already loaded.
find_package(OpenMP COMPONENTS CXX)
if(OpenMP_CXX_FOUND)
  target_link_libraries(hsr_torch_cpu INTERFACE OpenMP::OpenMP_CXX)
else()
  message(WARNING "hsr: no OpenMP for the C++ compiler: the CPU ops will run on one thread.")
endif()

add_library(hsr_torch_cuda INTERFACE)
if(TORCH_CUDA_VERSION)
  _hsr_torch_library(HSR_LIBC10_CUDA c10_cuda)
  target_link_libraries(hsr_torch_cuda INTERFACE hsr_torch_cpu "${HSR_LIBC10_CUDA}")
  target_compile_definitions(hsr_torch_cuda INTERFACE USE_CUDA=1)
endif()
