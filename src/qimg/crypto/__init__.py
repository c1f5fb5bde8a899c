"""Disk encryption: secrets (``--object secret``), LUKS1 headers and the
sector ciphers QEMU's crypto layer uses.

Importing this package (or ``secret``) is cheap; ``cipher`` loads
cryptography and numpy only when a cipher is made, so ``qimg info`` of an
encrypted image never loads them.  Nothing here knows the command line.
"""
