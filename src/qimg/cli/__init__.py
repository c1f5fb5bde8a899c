"""The command line: qemu-img's grammar over the qimg API."""
