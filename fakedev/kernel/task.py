"""The calling task, as the model sees it.

The model never touches the OS. Each call receives a ``Task``: the thread that
made the system call. Through it the model does what the kernel does with
``copy_from_user``/``copy_to_user`` (``read``/``write``, which raise
``KernelError(EFAULT)`` on an unmapped address, also when only the tail of the
range is unmapped), ``fget`` (look up one of the task's fd numbers) and
``capable``.

``fget`` answers with one of:
- a model ``File`` (an open of one of our nodes, found by its identity);
- a ``ForeignFile`` (an fd that exists but is not ours: an eventfd, a pipe...);
- ``KernelError(EBADF)`` if the fd number is not open.

Getting a model ``File`` takes no reference: a model object that must outlive
the call (a bound device's iommufd context) takes its own reference on the
object behind the file (``IommufdCtx.get()``). A ``ForeignFile`` must be
``close()``d by whoever took it, unless it is kept (an
eventfd kept by SET_IRQS is closed when the trigger is torn down).

The FUSE glue implements Task over process_vm_readv/writev and pidfd_getfd;
``fakedev.kernel.testing.FakeTask`` implements it in memory for the tests.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from fakedev.kernel.file import File


class ForeignKind(enum.Enum):
    """What a file that is not ours is, as far as the model cares."""

    EVENTFD = "eventfd"
    OTHER = "other"


class ForeignFile(Protocol):
    """A file of the task's that fakedev does not serve."""

    @property
    def kind(self) -> ForeignKind: ...

    def signal(self, count: int = 1) -> None:
        """eventfd_signal(): add ``count`` to the eventfd counter (EVENTFD only)."""

    def close(self) -> None:
        """Drop this reference (fput)."""


class Task(Protocol):
    """The thread making the current call."""

    @property
    def pid(self) -> int:
        """Thread-group id (the process)."""

    @property
    def tid(self) -> int:
        """Thread id."""

    def read(self, addr: int, size: int) -> bytes:
        """copy_from_user: ``size`` bytes at ``addr`` or KernelError(EFAULT)."""

    def write(self, addr: int, data: bytes) -> None:
        """copy_to_user: write ``data`` at ``addr`` or KernelError(EFAULT).

        A fault part-way may leave a prefix written, as in the kernel.
        """

    def pin_pages(self, addr: int, length: int, write: bool) -> None:
        """pin_user_pages(): KernelError(EFAULT) unless every page of
        [addr, addr+length) is mapped in the task (and writable if ``write``).

        Nothing is read: this is how the model checks guest RAM of any size.
        """

    def fget(self, fd: int) -> File | ForeignFile:
        """Look up fd number ``fd`` of this task; KernelError(EBADF) if not open."""

    def capable(self, cap: int) -> bool:
        """capable(CAP_...) for this task."""

    def fd_install(self, file: File) -> int:
        """Give the task a new fd for ``file`` (O_CLOEXEC); returns the number.

        Only possible where the glue can create fds in the caller (the seccomp
        supervisor of ``fakedev run``). Where it cannot, it raises
        KernelError(ENOTTY) and the model drops ``file`` (releases it).
        """
