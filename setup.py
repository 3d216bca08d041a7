"""Build helexa_native._C.

With a CUDA build of torch and nvcc available, compiles the CUDA kernels, the
GPU forward and the device-worker runtime for the architectures named in
TORCH_CUDA_ARCH_LIST (default: 8.0;8.9;9.0;10.0). Otherwise (CPU torch, no
nvcc, or HX_BUILD_CPU_ONLY=1) builds only the host parts: the same worker
queue, futures, poisoning and shutdown code as a host-only worker.
"""

import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"
DEFAULT_ARCHS = "8.0;8.9;9.0;10.0"


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _cuda_wanted():
    if os.environ.get("HX_BUILD_CPU_ONLY", "0") == "1":
        return False
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception:
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def _nccl_paths():
    """Include and lib dirs of the nvidia-nccl wheel that CUDA torch installs."""
    try:
        import nvidia.nccl as nccl_pkg
    except Exception:
        return None
    base = list(nccl_pkg.__path__)[0]
    inc, lib = os.path.join(base, "include"), os.path.join(base, "lib")
    if os.path.exists(os.path.join(inc, "nccl.h")) and glob.glob(os.path.join(lib, "libnccl.so*")):
        return inc, lib
    return None


def _nvidia_wheel_dirs():
    """include/lib dirs of the nvidia-* wheels (cuBLAS etc.) next to a CUDA torch."""
    out = []
    try:
        import nvidia
    except Exception:
        return out
    for base in list(nvidia.__path__):
        for sub in sorted(os.listdir(base)):
            inc, lib = os.path.join(base, sub, "include"), os.path.join(base, sub, "lib")
            if os.path.isdir(inc):
                out.append((inc, lib))
    return out


def _cublas_paths():
    """Where cublas_v2.h and libcublas live: the toolkit, else torch's nvidia wheels."""
    from torch.utils.cpp_extension import CUDA_HOME

    if os.path.exists(os.path.join(CUDA_HOME, "include", "cublas_v2.h")):
        return None
    for inc, lib in _nvidia_wheel_dirs():
        if os.path.exists(os.path.join(inc, "cublas_v2.h")) and glob.glob(os.path.join(lib, "libcublas.so*")):
            return inc, lib
    return None


def _arch_tags(arch_list):
    tags = []
    for a in arch_list.replace(",", ";").replace(" ", ";").split(";"):
        a = a.strip().replace("+PTX", "")
        if a:
            tags.append(a.replace(".", ""))
    return tags


def _extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    host_sources = _rel(
        glob.glob(os.path.join(ROOT, "csrc/runtime/*.cpp")) + glob.glob(os.path.join(ROOT, "csrc/bindings/*.cpp"))
    )
    # Torch-op bindings include torch/extension.h and wrap CUDA kernels: CUDA builds only.
    host_only = [s for s in host_sources if not os.path.basename(s).startswith("ops")]
    include_dirs = [os.path.join(ROOT, "csrc")]
    # No -std here: torch adds the standard its headers need (C++20 for recent releases).
    cxx_flags = ["-O3"]

    if not _cuda_wanted():
        return [
            CppExtension(
                "helexa_native._C",
                host_only,
                include_dirs=include_dirs,
                define_macros=[("HX_ARCHS", '""'), ("HX_VERSION", f'"{VERSION}"')],
                extra_compile_args={"cxx": cxx_flags},
                extra_link_args=["-lpthread"],
            )
        ]

    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    archs = ";".join(_arch_tags(arch_list))
    cuda_sources = _rel(
        glob.glob(os.path.join(ROOT, "csrc/kernels/*.cu"))
        + glob.glob(os.path.join(ROOT, "csrc/model/*.cu"))
        + glob.glob(os.path.join(ROOT, "csrc/model/*.cpp"))
        + glob.glob(os.path.join(ROOT, "csrc/runtime/*.cu"))
    )
    defines = [("HX_WITH_CUDA", "1"), ("HX_ARCHS", f'"{archs}"'), ("HX_VERSION", f'"{VERSION}"')]
    libraries = []
    library_dirs, runtime_dirs = [], []
    extra_link = []
    cublas = _cublas_paths()
    if cublas is None:
        libraries += ["cublas", "cublasLt"]
    else:
        include_dirs.append(cublas[0])
        library_dirs.append(cublas[1])
        runtime_dirs.append(cublas[1])
        for name in ("libcublas.so", "libcublasLt.so"):
            found = sorted(glob.glob(os.path.join(cublas[1], name + "*")))
            extra_link.append("-l:" + os.path.basename(found[0]))
    nccl = _nccl_paths()
    if nccl is not None:
        include_dirs.append(nccl[0])
        library_dirs.append(nccl[1])
        runtime_dirs.append(nccl[1])
        defines.append(("HX_WITH_NCCL", "1"))
        libnccl = sorted(glob.glob(os.path.join(nccl[1], "libnccl.so*")))[0]
        extra_link.append("-l:" + os.path.basename(libnccl))
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-Xptxas=-warn-spills"]
    return [
        CUDAExtension(
            "helexa_native._C",
            host_sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=defines,
            libraries=libraries,
            library_dirs=library_dirs,
            runtime_library_dirs=runtime_dirs,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=extra_link + ["-lpthread"],
        )
    ]


def _version():
    local = os.environ.get("HX_LOCAL_VERSION", "")
    return f"{VERSION}+{local}" if local else VERSION


if __name__ == "__main__":
    from torch.utils.cpp_extension import BuildExtension

    setup(
        name="helexa_native",
        version=_version(),
        packages=find_packages(include=["helexa_native", "helexa_native.*"]),
        ext_modules=_extensions(),
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        zip_safe=False,
    )
