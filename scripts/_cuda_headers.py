"""Helper of check_cuda_bindings.sh: lists the CUDA math-library wheels a torch wheel pins, and
extracts the headers (torch/include, nvidia/*/include) from downloaded wheels. Stdlib only."""
import glob
import os
import re
import sys
import zipfile

LIBS = "cublas,cusparse,cusolver"  # what ATen/cuda/CUDAContextLight.h includes


def requirements(torch_whl):
    with zipfile.ZipFile(torch_whl) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    for line in lines:
        if not line.startswith("Requires-Dist:") or "extra ==" in line:
            continue
        req = line.split(":", 1)[1].split(";")[0].strip()
        if req.startswith("cuda-toolkit"):
            print(re.sub(r"\[.*\]", f"[{LIBS}]", req))
        elif re.match(rf"nvidia-({LIBS.replace(',', '|')})-cu", req):
            print(req)


def extract(tmp, dst):
    [torch_whl] = glob.glob(os.path.join(tmp, "torch", "torch-*.whl"))
    with zipfile.ZipFile(torch_whl) as z:
        z.extractall(dst, [n for n in z.namelist() if n.startswith("torch/include/")])
        os.rename(os.path.join(dst, "torch", "include"), os.path.join(dst, "include"))
        with open(os.path.join(dst, "include", "TORCH_VERSION.py"), "wb") as f:
            f.write(z.read("torch/version.py"))
    libs = os.path.join(dst, "cuda-libs-include")
    os.makedirs(libs)
    for whl in glob.glob(os.path.join(tmp, "libs", "nvidia_*.whl")):
        with zipfile.ZipFile(whl) as z:
            for n in z.namelist():  # nvidia/<cu13|cublas|...>/include/<header>, flattened
                if re.fullmatch(r"nvidia/[^/]+/include/[^/]+\.(h|hpp)", n):
                    with open(os.path.join(libs, os.path.basename(n)), "wb") as f:
                        f.write(z.read(n))


if __name__ == "__main__":
    {"requirements": requirements, "extract": extract}[sys.argv[1]](*sys.argv[2:])
