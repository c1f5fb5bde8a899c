"""The commands' logic, format-neutral: one module per qemu-img command."""
