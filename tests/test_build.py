"""The build/loading system: status report, lazy loading, disabling, fallbacks, the info command."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fada_core import _build, _compile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.pop("FADA_CORE_DISABLE_KERNELS", None)
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=900,
    )


STATUS_KEYS = {
    "python", "torch", "torch_cuda", "cuda_available", "cuda_devices", "cuda_home", "nvcc", "cxx",
    "ninja", "torch_cuda_arch_list", "disabled", "aot_extension", "loaded", "origin", "library",
    "failure", "cpu_capability", "cuda_kernels", "cuda_kernels_reason", "would_build_cuda", "build_dir", "ops",
}


def test_status_keys_and_values():
    from fada_core.info import status as info_status

    status = info_status()
    assert STATUS_KEYS <= set(status)
    assert status["torch"] == torch.__version__
    assert status["cuda_available"] == torch.cuda.is_available()
    assert isinstance(status["build_dir"], str) and status["build_dir"]
    if not torch.cuda.is_available():
        assert not status["cuda_kernels"] or status["loaded"]
        assert "8.0;9.0" in (status["torch_cuda_arch_list"] or "") or os.environ.get("TORCH_CUDA_ARCH_LIST")


def test_status_after_load_lists_the_class_stats_kernel(kernel_ops):
    status = _build.status()
    assert status["loaded"] and status["origin"] in ("jit", "aot") and status["failure"] is None
    assert os.path.isfile(status["library"])
    assert "cpu" in status["ops"]["fada_core::class_center_stats"]
    assert _build.kernels_available("cpu", "class_center_stats")
    assert _build.kernels_available(torch.device("cpu"), "fada_core::class_center_stats")
    assert _build.kernels_available(torch.zeros(1), "class_center_stats")
    # device-independent operators (no tensors) count for every device
    assert status["ops"]["fada_core::cuda_backward_max_channels"] == ["any"]
    assert _build.kernels_available("cpu")
    cpu = status["cpu_capability"]
    assert cpu["supported"][0] == "default" and cpu["in_use"] in cpu["supported"] and cpu["reason"]
    if not torch.cuda.is_available() and not status["cuda_kernels"]:
        assert not _build.kernels_available("cuda", "class_center_stats")
        assert status["cuda_kernels_reason"]


def test_sources_and_flags():
    cpu = _compile.sources(with_cuda=False)
    cuda = _compile.sources(with_cuda=True)
    assert cpu[0].endswith("fada_core.cpp")
    # the kernel sources are compiled through one wrapper per instruction set, not on their own
    names = [os.path.relpath(s, _compile.CSRC) for s in cpu]
    assert {"cpu/dispatch.cpp", "cpu/isa/default.cpp", "cpu/isa/avx2.cpp", "cpu/isa/avx512.cpp"} <= set(names)
    assert not any(s.endswith("_kernel.cpp") for s in cpu)
    assert not any(s.endswith(".cu") for s in cpu)
    assert any(s.endswith("class_stats_kernel.cu") for s in cuda) and set(cpu) <= set(cuda)
    assert not any(f.startswith("-march") for f in _compile.compile_args(False)["cxx"])  # one library, every CPU
    assert _compile.build_directory(False) != _compile.build_directory(True)
    assert "--use_fast_math" not in _compile.compile_args(True)["nvcc"]
    assert "-v" in _compile.compile_args(True, ptxas_verbose=True)["nvcc"]
    assert "-v" not in _compile.compile_args(True)["nvcc"]


def _codegen(flags):
    """What of a g++ command line changes the machine code it makes (the last flag of each kind wins)."""
    state = {"opt": "-O0", "wrapv": False, "ndebug": False, "arch": None, "fp": []}
    for flag in flags:
        if flag.startswith("-O"):
            state["opt"] = flag
        elif flag in ("-fwrapv", "-fno-wrapv"):
            state["wrapv"] = flag == "-fwrapv"
        elif flag in ("-DNDEBUG", "-UNDEBUG"):
            state["ndebug"] = flag == "-DNDEBUG"
        elif flag.startswith(("-march", "-mtune")):
            state["arch"] = flag
        elif flag.startswith("-f") and "math" in flag:
            state["fp"].append(flag)
    return state


@pytest.mark.parametrize("python_cflags", [
    "sysconfig", "-DNDEBUG -g -fwrapv -O3 -Wall", "-DNDEBUG -g -fwrapv -O2 -Wall", "-g -O0", "",
])
def test_aot_build_compiles_as_the_jit_build(python_cflags):
    # setup.py's AOT build puts Python's CFLAGS (CPython's: -DNDEBUG -g -fwrapv -O3 -Wall) before
    # the library's flags; the JIT build has only the library's. Same code generation either way,
    # so the pip-installed library is the JIT one (benchmarks/compare_builds.py checks the machine code).
    import sysconfig

    if python_cflags == "sysconfig":
        python_cflags = sysconfig.get_config_var("CFLAGS") or ""
    ours = _compile.compile_args(False)["cxx"]
    aot, jit = _codegen(python_cflags.split() + ours), _codegen(ours)
    assert aot == jit
    assert jit["opt"] == "-O3" and jit["ndebug"] and not jit["wrapv"] and jit["arch"] is None


def test_cuda_decision_without_gpu(monkeypatch):
    if torch.cuda.is_available() or torch.version.cuda is None:
        pytest.skip("needs a CUDA build of torch with no GPU visible")
    monkeypatch.delenv("FADA_CORE_FORCE_CUDA", raising=False)
    include, reason = _compile.cuda_decision()
    assert not include and "FADA_CORE_FORCE_CUDA" in reason
    monkeypatch.setenv("FADA_CORE_FORCE_CUDA", "1")
    include, reason = _compile.cuda_decision()
    assert include == (_compile.cuda_home() is not None)


def test_import_does_not_load_kernels():
    proc = _run_python(
        """
        import torch, fada_core
        from fada_core import _build
        assert not _build.is_loaded()
        assert not any(n.startswith("fada_core::") for n in torch._C._dispatch_get_all_op_names())
        print("ok")
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert "ok" in proc.stdout


def test_disable_kernels_env_falls_back_to_eager():
    proc = _run_python(
        """
        import warnings
        import pytest
        import torch
        import fada_core
        import fada_core.functional as FF
        from fada_core import _build, _reference
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # disabling on purpose is not worth a warning
            assert _build.kernels_available("cpu") is False
            assert _build.kernels_available("cpu", "class_center_stats") is False
        assert "FADA_CORE_DISABLE_KERNELS" in _build.failure_reason()
        with pytest.raises(RuntimeError, match="FADA_CORE_DISABLE_KERNELS"):
            _build.load()
        f = torch.randn(2, 3, 4, 5)
        y = torch.randint(0, 3, (2, 4, 5))
        s = FF.class_center_stats(f, y, 3, backend="auto")
        r = _reference.class_center_stats(f, y, 3, 255)
        assert torch.equal(s.counts, r[0]) and torch.allclose(s.means, r[1])
        ccd = fada_core.ClassCenterDistance(3, backend="auto")
        ccd.update(f, y)
        assert ccd.compute().present.all()
        with pytest.raises(RuntimeError, match="FADA_CORE_DISABLE_KERNELS"):
            FF.class_center_stats(f, y, 3, backend="kernel")
        assert not any(n.startswith("fada_core::") for n in torch._C._dispatch_get_all_op_names())
        print("ok")
        """,
        FADA_CORE_DISABLE_KERNELS="1",
    )
    assert proc.returncode == 0, proc.stderr
    assert "ok" in proc.stdout


def test_failed_build_warns_once_and_falls_back(tmp_path):
    if _build.aot_extension() is not None:
        pytest.skip("an ahead-of-time fada_core._C is installed; no JIT build would run")
    proc = _run_python(
        """
        import warnings
        import pytest
        import torch
        import fada_core.functional as FF
        from fada_core import _build
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert _build.kernels_available("cpu", "class_center_stats") is False
            assert _build.kernels_available("cpu") is False
            f, y = torch.randn(1, 2, 3, 3), torch.zeros(1, 3, 3, dtype=torch.long)
            s = FF.class_center_stats(f, y, 2, backend="auto")
        ours = [w for w in caught if "fada_core" in str(w.message)]
        assert len(ours) == 1, [str(w.message) for w in caught]
        assert "eager" in str(ours[0].message)
        assert s.counts.tolist() == [9.0, 0.0]
        reason = _build.failure_reason()
        assert reason and "failed" in reason
        with pytest.raises(RuntimeError, match="failed"):
            FF.class_center_stats(f, y, 2, backend="kernel")
        assert _build.status()["failure"] == reason
        print("ok")
        """,
        CXX="/nonexistent/compiler",
        TORCH_EXTENSIONS_DIR=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok" in proc.stdout
    # the build announced itself once (what and why), and did not claim to have finished
    assert proc.stderr.count("fada_core: compiling") == 1 and "no up-to-date build" in proc.stderr
    assert "compiled in" not in proc.stderr


def test_info_does_not_build(tmp_path):
    if _build.aot_extension() is not None:
        pytest.skip("an ahead-of-time fada_core._C is installed")
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path))
    env.pop("FADA_CORE_DISABLE_KERNELS", None)
    proc = subprocess.run([sys.executable, "-m", "fada_core.info"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "not built yet" in proc.stdout and "--build" in proc.stdout
    assert "compiling" not in proc.stderr
    assert not any(name.endswith(".so") for _, _, files in os.walk(tmp_path) for name in files)


@pytest.mark.parametrize("value", ["default", "sse9"])
def test_cpu_capability_override_at_load(kernel_ops, value):
    # FADA_CORE_CPU_CAPABILITY picks the instruction-set build when the library loads; a value that
    # is not a build name is reported (and warned about), and the widest build runs.
    proc = _run_python(
        """
        import warnings
        from fada_core import _build
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _build.load(build=False)
        cpu = _build.cpu_capability()
        print("IN_USE", cpu["in_use"], "WIDEST", cpu["supported"][-1])
        print("REASON", cpu["reason"])
        print("WARNED", [str(w.message) for w in caught if "fada_core" in str(w.message)])
        """,
        FADA_CORE_CPU_CAPABILITY=value,
    )
    assert proc.returncode == 0, proc.stderr
    if value == "default":
        assert "IN_USE default" in proc.stdout and "REASON FADA_CORE_CPU_CAPABILITY=default" in proc.stdout
        assert "WARNED []" in proc.stdout
    else:
        in_use, widest = proc.stdout.split("IN_USE ")[1].split()[0::2][:2]
        assert in_use == widest
        assert "sse9 ignored" in proc.stdout and "WARNED ['fada_core" in proc.stdout


def test_use_cpu_capability_switches_and_restores(kernel_ops):
    before = _build.cpu_capability()["in_use"]
    with _build.use_cpu_capability("default"):
        assert _build.cpu_capability()["in_use"] == "default"
    assert _build.cpu_capability()["in_use"] == before
    with pytest.raises(ValueError, match="cpu capability"):
        with _build.use_cpu_capability("sse9"):
            pass
    assert _build.cpu_capability()["in_use"] == before


def test_info_command_prints_versions():
    proc = subprocess.run(
        [sys.executable, "-m", "fada_core.info"], cwd=REPO, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr
    assert torch.__version__ in proc.stdout
    assert "kernels:" in proc.stdout


def test_info_build_fails_with_reason_when_disabled():
    env = dict(os.environ, FADA_CORE_DISABLE_KERNELS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "fada_core.info", "--build"], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "FADA_CORE_DISABLE_KERNELS" in proc.stderr


def test_info_json_no_load():
    import json

    proc = subprocess.run(
        [sys.executable, "-m", "fada_core.info", "--no-load", "--json"], cwd=REPO, capture_output=True, text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    assert status["torch"] == torch.__version__ and status["loaded"] is False


@pytest.mark.parametrize("build_ext", ["", "1"])
def test_setup_py_metadata_with_and_without_extension(build_ext):
    # Without FADA_CORE_BUILD_EXT the install is pure Python (setup.py must not need
    # torch); with it, setup.py declares fada_core._C from the same sources as the JIT build.
    code = (
        "import sys, setuptools\n"
        "captured = {}\n"
        "setuptools.setup = lambda **kw: captured.update(kw)\n"
        "sys.argv = ['setup.py', '--name']\n"
        "import runpy; runpy.run_path('setup.py', run_name='__main__')\n"
        "exts = captured.get('ext_modules', [])\n"
        "print('EXT', [e.name for e in exts], sorted(s.split('/')[-1] for e in exts for s in e.sources))\n"
        "print('TORCH_IMPORTED', 'torch' in sys.modules)\n"
    )
    proc = _run_python(code, FADA_CORE_BUILD_EXT=build_ext)
    assert proc.returncode == 0, proc.stderr
    if build_ext:
        assert "EXT ['fada_core._C']" in proc.stdout
        assert "fada_core.cpp" in proc.stdout and "dispatch.cpp" in proc.stdout and "avx512.cpp" in proc.stdout
    else:
        assert "EXT []" in proc.stdout and "TORCH_IMPORTED False" in proc.stdout


def test_wide_instructions_only_in_their_builds(kernel_ops):
    # Every function with AVX/AVX-512 instructions (VEX/EVEX-encoded, mnemonics starting with "v", or the
    # AVX-512 mask ones) must belong to the AVX2 or AVX-512 build of the kernels. If an inline function
    # from a shared header were first compiled inside one of those builds, the linker could keep that copy
    # for every caller, and the default build would run AVX code on a CPU without it.
    import platform
    import re
    import shutil

    if platform.machine() not in ("x86_64", "AMD64") or shutil.which("objdump") is None:
        pytest.skip("needs x86-64 and objdump")
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", _build.status()["library"]],
                             capture_output=True, text=True, timeout=300, check=True).stdout
    wide, name = set(), None
    for line in listing.splitlines():
        if re.match(r"^[0-9a-f]+ <.*>:$", line):
            name = line
        elif re.match(r"^ +[0-9a-f]+:\t(v[a-z0-9]+|k[a-z]+)[ \t]", line):
            wide.add(name)
    assert any("fada_cpu_avx512" in n for n in wide)  # the check sees AVX-512 code where it belongs
    assert [n for n in wide if "fada_cpu_avx2" not in n and "fada_cpu_avx512" not in n] == []


def test_package_data_ships_every_source():
    """setup.cfg's package_data (what the sdist and wheel carry for an AOT or JIT build) matches every
    file under csrc: its globs are not recursive, so a new folder needs its own pattern."""
    import configparser
    import fnmatch

    config = configparser.ConfigParser()
    config.read(os.path.join(REPO, "setup.cfg"))
    value = config["options.package_data"]["fada_core"]
    # as setuptools reads a list: one item per line if there are several lines, else comma-separated
    patterns = [p.strip() for p in (value.strip().splitlines() if "\n" in value.strip() else value.split(","))]
    package = os.path.join(REPO, "fada_core")
    sources = [os.path.relpath(os.path.join(root, name), package).replace(os.sep, "/")
               for root, _, names in os.walk(_compile.CSRC) for name in names]
    # fnmatch's * crosses "/", setuptools' does not: compare folder by folder
    unshipped = [s for s in sources
                 if not any(fnmatch.fnmatch(s, p) and s.count("/") == p.count("/") for p in patterns)]
    assert sources and unshipped == []
