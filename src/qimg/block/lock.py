"""Image locking as QEMU's file protocol does it, so that qimg and QEMU
processes see each other's locks (block/file-posix.c).

Every node of QEMU's block graph holds *permissions* on its children (read
consistently, write, write without changing the contents, resize) and says
which of them it lets other users have.  The protocol node carries them to
the host file as open-file-description (OFD) byte-range locks, always shared
(read) locks:

* byte ``100 + bit`` for each permission held,
* byte ``200 + bit`` for each permission it refuses to share.

A new user first takes its own bytes, then tests (F_OFD_GETLK with a write
lock) the *shared* byte of every permission it wants and the *perm* byte of
every permission it refuses: a read lock held there by another open file
description is a conflict.  Locks live as long as the open file description;
closing its last descriptor drops them.

The bits are qemu 7.2's: consistent read 0, write 1, write unchanged 2,
resize 3 (BLK_PERM_GRAPH_MOD, bit 4, was gone by then: bytes 104 and 204,
which qemu 6.1 and older may still lock, are never touched).

Within one process the locks of one host file are held by ONE open file
description, for the union of what every File of this process on it needs:
the first File's own descriptor, as QEMU locks on the fd it does I/O with
(so a process that dies, or a test that "crashes" by closing the fd, leaves
nothing behind); when that File closes, the next one takes the locks over.
QEMU keeps one node per image and changes its permissions in place on a
reopen (commit making its base writable, check -r); qimg instead opens the
file a second time, so two opens of one file in one process must not
conflict with each other at this level.  The conflicts QEMU reports between
nodes of one process (convert onto its own source, a backing chain that
loops back to a writable image) are checked where qimg makes them, with
QEMU's messages.  Another process, qemu or qimg, sees exactly the bytes a
QEMU process in our place would hold.

Where the host has no OFD locks, nothing is locked (QEMU's locking=auto).
"""

from __future__ import annotations

import errno
import os
import struct

from qimg.errors import QimgError

try:
    import fcntl

    _SETLK: int | None = fcntl.F_OFD_SETLK
    _GETLK: int | None = fcntl.F_OFD_GETLK
except (ImportError, AttributeError):  # not Linux: no OFD locks, no locking
    _SETLK = _GETLK = None

CONSISTENT_READ = 0x01
WRITE = 0x02
WRITE_UNCHANGED = 0x04
RESIZE = 0x08
ALL = 0x0F

PERM_BASE = 100
SHARED_BASE = 200

#: bdrv_perm_names
_NAMES = {CONSISTENT_READ: "consistent read", WRITE: "write", WRITE_UNCHANGED: "write unchanged",
          RESIZE: "resize"}
_BITS = (CONSISTENT_READ, WRITE, WRITE_UNCHANGED, RESIZE)

# struct flock: l_type, l_whence, l_start, l_len, l_pid; the buffer is
# padded to the alignment of its 64-bit members as the C struct is
_FLOCK = struct.Struct("@hhqqi")
_FLOCK_SIZE = (_FLOCK.size + 7) // 8 * 8
_F_RDLCK, _F_WRLCK, _F_UNLCK = 0, 1, 2
if _SETLK is not None:
    _F_RDLCK, _F_WRLCK, _F_UNLCK = fcntl.F_RDLCK, fcntl.F_WRLCK, fcntl.F_UNLCK

_supported: bool | None = None


def supported() -> bool:
    """qemu_has_ofd_lock: ask the kernel once, on /dev/null."""
    global _supported
    if _supported is None:
        _supported = False
        if _GETLK is not None:
            try:
                fd = os.open(os.devnull, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
            except OSError:
                return False
            try:
                fcntl.fcntl(fd, _GETLK, _flock(_F_WRLCK, 0, 0))
                _supported = True
            except OSError as e:
                _supported = e.errno != errno.EINVAL
            finally:
                os.close(fd)
    return _supported


def _flock(kind: int, start: int, length: int) -> bytes:
    return _FLOCK.pack(kind, os.SEEK_SET, start, length, 0).ljust(_FLOCK_SIZE, b"\0")


# ---- what a node asks of its file -------------------------------------------
#: -U of the running command, for opens that are not told (qemu-img info and
#: check open through paths of their own); set by the command line
command_force_share = False


def image_perms(fmt: str, read_only: bool, force_share: bool = False, no_io: bool = False) -> tuple[int, int]:
    """(perm, shared) that qemu-img's image node passes down to its file.

    A qemu-img BlockBackend shares write and resize with others; a format
    node keeps anyone else from writing or resizing the file that holds its
    metadata (bdrv_default_perms_for_storage), and may itself resize it.
    raw passes its user's permissions through unchanged.  info opens with
    BDRV_O_NO_IO and reads nothing consistently; -U shares everything."""
    perm = 0 if no_io else CONSISTENT_READ
    if fmt == "raw":
        if not read_only:
            perm |= WRITE
        return perm, ALL
    if not read_only:
        perm |= WRITE | RESIZE
    return perm, ALL if force_share else ALL & ~(WRITE | RESIZE)


def data_perms(read_only: bool, force_share: bool = False, no_io: bool = False) -> tuple[int, int]:
    """(perm, shared) of a file that holds guest data only (a qcow2 external
    data file: BDRV_CHILD_DATA): resizable when written, never resized by
    others.  info (no I/O) does not open such a file in QEMU: no locks."""
    if no_io:
        return 0, ALL
    perm = CONSISTENT_READ if read_only else CONSISTENT_READ | WRITE | RESIZE
    return perm, ALL if force_share else ALL & ~RESIZE


#: raw_co_create: write and resize, and no one else resizes meanwhile
CREATE_PERMS = (WRITE | RESIZE, ALL & ~RESIZE)


class ChildOpen:
    """While a format driver opens (``with ChildOpen(...)``), a File it
    opens without being told its permissions is a data child of that image
    and takes its -U and no-I/O from it."""

    stack: list[tuple[bool, bool]] = []

    def __init__(self, force_share: bool, no_io: bool) -> None:
        self.state = (force_share, no_io)

    def __enter__(self) -> "ChildOpen":
        ChildOpen.stack.append(self.state)
        return self

    def __exit__(self, *exc: object) -> None:
        ChildOpen.stack.pop()


def default_perms(read_only: bool) -> tuple[int, int]:
    """What a File not told its permissions holds: a data child's while a
    driver opens; otherwise, read-only, a plain reader's, and read-write an
    image file's (the writable file check -r puts under an image opened
    read-only, and the second opens of image creation)."""
    if ChildOpen.stack:
        force_share, no_io = ChildOpen.stack[-1]
        return data_perms(read_only, force_share and read_only, no_io)
    if read_only:
        return CONSISTENT_READ, ALL
    return image_perms("", read_only)


# ---- the locks ----------------------------------------------------------------
class _Inode:
    """This process's locks on one host file, for all of its Files on it,
    carried by the descriptor of one of them (its first)."""

    __slots__ = ("key", "users", "locked_perm", "locked_shared")

    def __init__(self, key: tuple[int, int]) -> None:
        self.key = key
        self.users: list[Lock] = []
        #: bits whose perm / shared bytes the carrier has locked
        self.locked_perm = 0
        self.locked_shared = 0

    @property
    def fd(self) -> int:
        return self.users[0].fd

    def wanted(self) -> tuple[int, int]:
        """(perm, unshared) of all users together."""
        return Lock.wanted_of(self.users)

    def apply(self, perm: int, unshared: int, unlock: bool) -> None:
        """raw_apply_lock_bytes: lock what is wanted and not yet locked; with
        ``unlock`` also drop what is locked and no longer wanted."""
        fd = self.fd
        for base, want, attr in ((PERM_BASE, perm, "locked_perm"), (SHARED_BASE, unshared, "locked_shared")):
            for i, bit in enumerate(_BITS):
                locked = getattr(self, attr)
                if want & bit and not locked & bit:
                    try:
                        fcntl.fcntl(fd, _SETLK, _flock(_F_RDLCK, base + i, 1))
                    except OSError as e:
                        raise QimgError(_with_errno(f"Failed to lock byte {base + i}", e.errno)) from None
                    setattr(self, attr, locked | bit)
                elif unlock and locked & bit and not want & bit:
                    try:
                        fcntl.fcntl(fd, _SETLK, _flock(_F_UNLCK, base + i, 1))
                    except OSError:
                        pass  # unlocking cannot fail (qemu only warns), or the fd is gone
                    setattr(self, attr, locked & ~bit)

    def check(self, perm: int, unshared: int) -> None:
        """raw_check_lock_bytes: another open file description holding the
        shared byte of a permission we want, or the perm byte of one we do
        not share, is a conflict."""
        for i, bit in enumerate(_BITS):
            if perm & bit:
                err = self._test(SHARED_BASE + i)
                if err:
                    raise QimgError(_with_errno(f'Failed to get "{_NAMES[bit]}" lock', err))
        for i, bit in enumerate(_BITS):
            if unshared & bit:
                err = self._test(PERM_BASE + i)
                if err:
                    raise QimgError(_with_errno(f'Failed to get shared "{_NAMES[bit]}" lock', err))

    def _test(self, byte: int) -> int:
        """0 when free, else an errno (EAGAIN: someone holds it).  The
        carrier's own locks never conflict with it, and no other descriptor
        of this process holds any: what is found is another process's."""
        try:
            got = fcntl.fcntl(self.fd, _GETLK, _flock(_F_WRLCK, byte, 1))
        except OSError as e:
            return e.errno or errno.EIO
        return 0 if _FLOCK.unpack_from(got)[0] == _F_UNLCK else errno.EAGAIN

    def update(self, filename: str) -> None:
        """Bring the locks to what the users now want: take and test the new
        bytes first (nothing changes on failure), then drop the unneeded."""
        perm, unshared = self.wanted()
        before = (self.locked_perm, self.locked_shared)
        try:
            self.apply(perm, unshared, unlock=False)
            try:
                self.check(perm, unshared)
            except QimgError as e:
                e.detail = f"Is another process using the image [{filename}]?\n"
                raise
        except QimgError:
            self.apply(*before, unlock=True)
            raise
        self.apply(perm, unshared, unlock=True)

    def remove(self, user: "Lock") -> None:
        """``user`` stops holding anything; its descriptor is about to close."""
        if self.users[0] is not user:
            self.users.remove(user)
            try:
                self.apply(*self.wanted(), unlock=True)
            except QimgError:
                pass  # only unlocking
            return
        # the carrier leaves: the next File takes the locks over before the
        # old descriptor lets them go, so that no one can slip in between
        if len(self.users) > 1:
            perm, unshared = Lock.wanted_of(self.users[1:])
            for base, want in ((PERM_BASE, perm), (SHARED_BASE, unshared)):
                for i, bit in enumerate(_BITS):
                    if want & bit:
                        try:
                            fcntl.fcntl(self.users[1].fd, _SETLK, _flock(_F_RDLCK, base + i, 1))
                        except OSError:
                            pass  # read locks taken over conflict with no one's
        else:
            perm = unshared = 0
        self.apply(0, 0, unlock=True)
        self.users.pop(0)
        self.locked_perm, self.locked_shared = perm, unshared
        if not self.users:
            _inodes.pop(self.key, None)


_inodes: dict[tuple[int, int], _Inode] = {}


def _with_errno(message: str, err: int) -> str:
    # qemu leaves out the reason when it only says "someone holds it"
    if err in (errno.EAGAIN, errno.EACCES):
        return message
    return f"{message}: {os.strerror(err)}"


class Lock:
    """One File's permissions on its host file, held until release()."""

    __slots__ = ("inode", "fd", "perm", "shared", "filename")

    def __init__(self, inode: _Inode, fd: int, perm: int, shared: int, filename: str) -> None:
        self.inode: _Inode | None = inode
        self.fd = fd
        self.perm = perm
        self.shared = shared
        self.filename = filename

    @staticmethod
    def wanted_of(users: "list[Lock]") -> tuple[int, int]:
        """(perm, unshared) of ``users`` together."""
        perm = unshared = 0
        for user in users:
            perm |= user.perm
            unshared |= ALL & ~user.shared
        return perm, unshared

    def change(self, perm: int, shared: int) -> None:
        """Hold ``perm``/``shared`` from now on (QEMU's permission update on
        a reopen: in place).  On a conflict the old ones stay."""
        inode = self.inode
        if inode is None:
            return
        old = (self.perm, self.shared)
        self.perm, self.shared = perm, shared
        try:
            inode.update(self.filename)
        except QimgError:
            self.perm, self.shared = old
            raise

    def release(self) -> None:
        """Drop this File's part (before its descriptor closes)."""
        inode, self.inode = self.inode, None
        if inode is not None:
            inode.remove(self)


def acquire(fd: int, filename: str, perm: int, shared: int) -> Lock | None:
    """Take ``perm`` and refuse what ``shared`` lacks on the file open as
    ``fd`` (until release(), which must come before ``fd`` is closed);
    QimgError, with qemu's hint, on a conflict with another process.  None
    where the host cannot lock."""
    if not supported():
        return None
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino)
    inode = _inodes.get(key)
    if inode is None:
        inode = _inodes[key] = _Inode(key)
    lock = Lock(inode, fd, perm, shared, filename)
    inode.users.append(lock)
    try:
        inode.update(filename)
    except BaseException:
        lock.release()
        raise
    return lock
