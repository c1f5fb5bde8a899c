"""qcow2: QEMU's copy-on-write format (docs/interop/qcow2.txt)."""
