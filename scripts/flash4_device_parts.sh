#!/usr/bin/env bash
# Pack flash-attn-4 and its CuTe-DSL compiler for the offline GPU box, whose calls carry at most
# 64 MiB: the compiler's library alone is 185 MB, so it goes in a call of its own (.fa4a, ~50 MB
# with xz) and the rest in the next (.fa4b, ~19 MB), while the machine is still warm (it goes back
# after ~30 s idle). Run from the repository root; prints the two commands' install lines.
set -euo pipefail
VERSIONS=(flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1
          nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 apache-tvm-ffi==0.1.15.post2
          quack-kernels==0.6.5 torch-c-dlpack-ext==0.1.5)
IR=nvidia_cutlass_dsl/dsl_packages/cutlass/_mlir/_mlir_libs/_cutlass_ir.cu13.cpython-312-x86_64-linux-gnu.so
work=$(mktemp -d)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform any -d "$work/wheels" "${VERSIONS[@]}"
mkdir "$work/site"
for wheel in "$work"/wheels/*.whl; do unzip -q -o "$wheel" -d "$work/site"; done  # cp312 wheels: pip here may be another Python
mkdir -p .fa4a .fa4b
grep -qx "/.fa4a/" .git/info/exclude || printf "/.fa4a/\n/.fa4b/\n" >> .git/info/exclude
tar cf - -C "$work/site" "$IR" | xz -9 -T0 > .fa4a/ir.tar.xz
tar cf - -C "$work/site" --exclude="$(basename "$IR")" --exclude=nvidia_cutlass_dsl/cu13/lib/stubs . | xz -9 -T0 > .fa4b/rest.tar.xz
rm -rf "$work"
ls -la .fa4a .fa4b
cat <<'EOF'
call 1, carry [".fa4a"]:  mkdir -p /tmp/fa4site && tar xJf .fa4a/ir.tar.xz -C /tmp/fa4site
call 2, carry [".fa4b", ...]:  tar xJf .fa4b/rest.tar.xz -C /tmp/fa4site && export PYTHONPATH=/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages:$PYTHONPATH
EOF
