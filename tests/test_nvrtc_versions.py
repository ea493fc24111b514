"""The kernels compile (to PTX) under the oldest NVRTC each install extra allows, not only
under the newest, which CuPy loads in CI: NVRTC 13.0 refused a generic lambda that 13.5
took, and every warp-specialized Hopper forward failed on a GPU with 13.0 (2026-12-05).

No GPU needed. ``CUFLASH_NVRTC_LIBS`` lists libnvrtc.so paths (os.pathsep between them);
.ci/run fetches the 13.0 and 12.8 wheels and sets it. Elsewhere the test skips without it.
"""

import os

import pytest

from cuflash import nvrtc_frontend

LIBS = [p for p in os.environ.get("CUFLASH_NVRTC_LIBS", "").split(os.pathsep) if p]

if not LIBS:
    if os.environ.get("CI"):  # .ci/run provides the libraries: never skip there
        raise RuntimeError("CUFLASH_NVRTC_LIBS is not set in CI")
    pytest.skip("CUFLASH_NVRTC_LIBS not set (paths of older libnvrtc.so to check)",
                allow_module_level=True)


def test_the_check_sees_a_front_end_error():
    """A source the front end must refuse comes back as a failure with its error line."""
    spec, arch = nvrtc_frontend.representative_work()[0]
    nvrtc = nvrtc_frontend.Nvrtc(LIBS[0])
    ok, log = nvrtc.compile_log("extern \"C\" __global__ void k() { undeclared(); }",
                                spec.source, nvrtc_frontend.ptx_options(spec, arch))
    assert not ok and "undeclared" in log


@pytest.mark.parametrize("path", LIBS)
def test_every_front_end_path_compiles(path):
    work = nvrtc_frontend.representative_work()
    assert len(work) > 400  # every source, arch and modifier set, not a handful
    failed = nvrtc_frontend.front_end_failures(path, work)
    assert not failed, f"{len(failed)} of {len(work)}:\n" + "\n".join(failed)
